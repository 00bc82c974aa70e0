"""The denoiser S(x_t, t) -> x0_hat: a small time-conditioned UNet.

The network sees an interpolation x_t between the clean image and the noisy
photo (see ``pipeline.diffusion``) together with the *normalised* time
``t / T`` in [0, 1], and predicts the clean image. Keeping time normalised
lets the sampler take any number of steps K up to the model's T: its schedule
lands on the integer times the network was trained at.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCKS", "ModelConfig", "NAFBlock", "PRESETS", "ResBlock", "UNet", "build_model", "model_stats"]

#: Block types of the UNet: ``res`` (pre-norm ResBlock, SiLU) or ``naf`` (NAFNet's gated block).
BLOCKS = ("res", "naf")
TIME_CONDITIONING = ("shift", "scale")
CHANNEL_ATTENTION = ("linear", "sigmoid")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a UNet; stored next to every checkpoint."""

    width: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    blocks_per_level: int = 1
    attention: bool = False
    in_channels: int = 3
    attention_heads: int = 4
    time_scale: float = 1000.0  # spreads t/T over the sinusoid frequencies
    # Added after the first checkpoints: their configs lack these keys and load with the defaults,
    # which rebuild exactly the network they were trained with.
    block: str = "res"
    pool_window: int = 64  # naf: side of the local mean of its channel attention, in full-resolution pixels
    # naf: how t enters a block. "shift" adds the embedding before the gates (the presets, and
    # every NAF checkpoint so far); "scale" multiplies the gated features by (1 + embedding),
    # which cannot turn into a constant channel that the gates' products blow up.
    time_conditioning: str = "shift"
    # naf: the channel attention's multiplier: "linear" (NAFNet's, unbounded; the presets) or
    # "sigmoid" (2 sigmoid, in (0, 2), as squeeze-and-excitation bounds it).
    channel_attention: str = "linear"
    # LayerNorm over channels before the last conv (every checkpoint so far). NAFNet ends without
    # one; without it a constant channel costs loss directly instead of swamping the norm.
    output_norm: bool = True
    # Blocks at the lowest resolution, between the encoder and the decoder (NAFNet's middle
    # blocks). They see the widest context for little compute: at 1/8 of the side a block
    # costs 1/64 of its MACs per full-resolution pixel. Two in every checkpoint so far.
    mid_blocks: int = 2

    def __post_init__(self) -> None:
        # JSON round trips give lists; the dataclass must stay hashable and comparable.
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        if self.width < 1 or self.in_channels < 1 or self.blocks_per_level < 1 or self.pool_window < 1:
            raise ValueError(f"width, in_channels, blocks_per_level and pool_window must be >= 1: {self}")
        if self.mid_blocks < 2:
            raise ValueError(f"mid_blocks must be >= 2 (one on each side of the optional attention): {self}")
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; choose from {BLOCKS}")
        if self.time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"unknown time_conditioning {self.time_conditioning!r}; choose from {TIME_CONDITIONING}")
        if self.channel_attention not in CHANNEL_ATTENTION:
            raise ValueError(f"unknown channel_attention {self.channel_attention!r}; choose from {CHANNEL_ATTENTION}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be non-empty positive ints: {self.channel_mults}")

    @property
    def downsampling_factor(self) -> int:
        """Input sides must be a multiple of this; the UNet pads to it."""
        return 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "channel_mults": list(self.channel_mults)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # The most PSNR per CPU-minute of the ablation (docs/evaluation.md): NAFNet-style blocks at
    # width 16, ~0.86M parameters and ~38k MACs per pixel. Checkpoints of the earlier ResBlock
    # `tiny` keep their own config and still load.
    "tiny": ModelConfig(width=16, channel_mults=(1, 2, 4, 8), blocks_per_level=1, block="naf"),
    # The earlier `tiny`: ResBlocks, ~1.7M parameters, ~71k MACs per pixel.
    "tiny-res": ModelConfig(width=16, channel_mults=(1, 2, 4, 8), blocks_per_level=1, attention=False),
    # For a GPU: the same block at width 64 with two blocks per level, ~19M parameters and ~0.8M
    # MACs per pixel, half the compute of the ResBlock UNet with attention below.
    "base": ModelConfig(width=64, channel_mults=(1, 2, 4, 8), blocks_per_level=2, block="naf"),
    # Paper scale with ResBlocks and attention at the lowest level (the earlier `base`).
    "base-res": ModelConfig(width=64, channel_mults=(1, 2, 4, 8), blocks_per_level=2, attention=True),
}


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel.

    Unlike GroupNorm it uses no statistics over the image, so the output at a
    pixel depends only on its receptive field: 64x64 training patches and a
    4000x3000 photo are normalised alike, and (without attention, whose reach is
    the whole input) tiled inference matches whole-image inference away from tile borders.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square().mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """Transformer-style features of a (B,) float time, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Pre-norm residual block; the time embedding is added after the first conv."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = ChannelNorm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2 = ChannelNorm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def local_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of each channel over a window x window box that stays inside the image.

    The box is shifted inward at the borders, so on an image no larger than the
    window it is the global mean (what NAFNet's channel attention sees on a
    training patch) and on a large photo it is a mean over a patch-sized
    neighbourhood: the train/test statistics match (Chu et al. 2022, "TLC"),
    and a pixel's output does not depend on far-away content, so tiled and
    whole-image inference agree away from tile borders. Summed-area table, O(HW).
    """
    h, w = x.shape[-2:]
    if h <= window and w <= window:  # a training patch: the box is the whole image
        return x.mean(dim=(2, 3), keepdim=True)
    out = x.double()
    for dim, side in ((2, h), (3, w)):  # separable: a box sum along H, then along W
        size = min(window, side)
        start = (torch.arange(side, device=x.device) - size // 2).clamp(0, side - size)
        table = F.pad(out.cumsum(dim), (0, 0, 1, 0) if dim == 2 else (1, 0))
        out = table.index_select(dim, start + size) - table.index_select(dim, start)
        out = out / size
    return out.to(x.dtype)


class NAFBlock(nn.Module):
    """NAFNet's block (Chen et al. 2022, "Simple Baselines for Image Restoration"), time-conditioned.

    No nonlinear activation: a SimpleGate (one half of the channels times the
    other) after a depthwise conv, a simplified channel attention (a 1x1 conv
    of the local channel means, multiplied in), then a gated 1x1 feed-forward;
    LayerNorm over channels before each half and learnt residual scales that
    start at zero. A 1x1 conv adapts the width when ``in_ch != out_ch`` (skip
    joins in the decoder). ``time_conditioning`` and ``channel_attention`` choose
    between NAFNet's form (time added before the products, an unbounded
    attention; the presets) and one that adds no constant for the products to
    blow up (time as a scale after the gate, an attention bounded to (0, 2));
    docs/method.md "Network" says what each did to the early plateau.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, pool_window: int, time_conditioning: str = "shift",
                 channel_attention: str = "linear"):
        super().__init__()
        c = out_ch
        self.pool_window, self.time_conditioning = pool_window, time_conditioning
        self.bounded_attention = channel_attention == "sigmoid"
        self.skip = nn.Conv2d(in_ch, c, 1) if in_ch != c else nn.Identity()
        self.norm1 = ChannelNorm(c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.time = nn.Linear(time_dim, 2 * c if time_conditioning == "shift" else c)
        self.dwconv = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.attention = nn.Conv2d(c, c, 1)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.norm2 = ChannelNorm(c)
        self.ffn1 = nn.Conv2d(c, 2 * c, 1)
        self.ffn2 = nn.Conv2d(c, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.skip(x)
        time = self.time(emb)[:, :, None, None]
        if self.time_conditioning == "shift":
            h = self.gate(self.dwconv(self.conv1(self.norm1(x)) + time))
        else:
            h = self.gate(self.dwconv(self.conv1(self.norm1(x)))) * (1 + time)
        attention = self.attention(local_mean(h, self.pool_window))
        h = h * (2 * torch.sigmoid(attention) if self.bounded_attention else attention)
        x = x + self.beta * self.conv2(h)
        return x + self.gamma * self.ffn2(self.gate(self.ffn1(self.norm2(x))))


class SelfAttention(nn.Module):
    """Global multi-head self-attention; only affordable at the lowest resolution."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.heads = heads
        self.norm = ChannelNorm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)  # starts as an identity block
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))

    def matmul_macs(self, x: torch.Tensor) -> int:
        """MACs of QK^T and AV per image, which conv/linear hooks cannot see."""
        _, c, h, w = x.shape
        return 2 * (h * w) ** 2 * c


class UNet(nn.Module):
    """Time-conditioned UNet with a global residual: output = x_t + out_conv(h).

    ``forward(x, t)``: x is (B, C, H, W) in [0, 1] of any size, t is a (B,)
    float tensor of normalised time t/T in [0, 1] (a Python float is
    broadcast). The last conv is zero-initialised so an untrained network is
    the identity, which is already the right answer at t = 0 and a sane
    starting point everywhere else.
    """

    def __init__(self, config: ModelConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a ModelConfig or keyword arguments, not both")
        self.config = config
        c = config
        time_dim = 4 * c.width
        self.time_mlp = nn.Sequential(
            nn.Linear(c.width, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.in_conv = nn.Conv2d(c.in_channels, c.width, 3, padding=1)

        chans = [c.width * m for m in c.channel_mults]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = c.width
        def block(in_ch: int, out_ch: int, level: int) -> nn.Module:
            if c.block == "naf":
                return NAFBlock(in_ch, out_ch, time_dim, pool_window=max(1, c.pool_window >> level),
                                time_conditioning=c.time_conditioning, channel_attention=c.channel_attention)
            return ResBlock(in_ch, out_ch, time_dim)

        lowest = len(chans) - 1
        for level, out_ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(c.blocks_per_level):
                blocks.append(block(ch, out_ch, level))
                ch = out_ch
            self.down_blocks.append(blocks)
            last = level == len(chans) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid1 = block(ch, ch, lowest)
        self.mid_attn = SelfAttention(ch, c.attention_heads) if c.attention else nn.Identity()
        self.mid2 = block(ch, ch, lowest)
        self.mid_more = nn.ModuleList(block(ch, ch, lowest) for _ in range(c.mid_blocks - 2))

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(chans))):
            out_ch = chans[level]
            blocks = nn.ModuleList()
            for i in range(c.blocks_per_level):
                skip_ch = chans[level] if i == 0 else 0  # one skip per level, joined at its first block
                blocks.append(block(ch + skip_ch, out_ch, level))
                ch = out_ch
            self.up_blocks.append(blocks)
            if level > 0:  # the conv after upsampling already narrows to the next level's width
                self.upsamples.append(nn.Conv2d(ch, chans[level - 1], 3, padding=1))
                ch = chans[level - 1]
            else:
                self.upsamples.append(nn.Identity())

        self.out_norm = ChannelNorm(ch) if c.output_norm else nn.Identity()
        self.out_conv = nn.Conv2d(ch, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        b, _, h, w = x.shape
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        emb = self.time_mlp(sinusoidal_embedding(t, self.config.width, self.config.time_scale).to(x.dtype))

        xp = _pad_to_multiple(x, self.config.downsampling_factor)
        hcur = self.in_conv(xp)
        skips = []
        for blocks, down in zip(self.down_blocks, self.downsamples):
            for block in blocks:
                hcur = block(hcur, emb)
            skips.append(hcur)
            hcur = down(hcur)

        hcur = self.mid2(self.mid_attn(self.mid1(hcur, emb)), emb)
        for block in self.mid_more:
            hcur = block(hcur, emb)

        for blocks, up in zip(self.up_blocks, self.upsamples):
            hcur = torch.cat([hcur, skips.pop()], dim=1)
            for block in blocks:
                hcur = block(hcur, emb)
            if not isinstance(up, nn.Identity):
                hcur = up(F.interpolate(hcur, scale_factor=2.0, mode="nearest"))

        hcur = self.out_norm(hcur)
        residual = self.out_conv(hcur if self.config.block == "naf" else F.silu(hcur))
        return x + residual[:, :, :h, :w]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad bottom/right so every downsampling halves exactly.

    Reflection cannot pad by as much as the side itself, so very small inputs
    fall back to replicate padding.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def build_model(preset: str = "tiny", **overrides) -> UNet:
    """A UNet from a named preset, with any ModelConfig field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    config = PRESETS[preset]
    if overrides:
        config = ModelConfig(**{**asdict(config), **overrides})
    return UNet(config)


def model_stats(model: nn.Module, size: int = 256) -> dict[str, float]:
    """Parameter count and multiply-accumulates of one size x size image.

    Counted with forward hooks on Conv2d/Linear (plus the attention matmuls)
    while a copy of the model runs on the meta device, so no real compute or
    memory is spent even for the large preset.
    """
    params = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model).to("meta")
    macs = 0

    def conv_hook(mod: nn.Conv2d, inp, out) -> None:
        nonlocal macs
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        macs += out.numel() // out.shape[0] * k

    def linear_hook(mod: nn.Linear, inp, out) -> None:
        nonlocal macs
        macs += out.numel() // out.shape[0] * mod.in_features

    def attention_hook(mod: SelfAttention, inp, out) -> None:
        nonlocal macs
        macs += mod.matmul_macs(inp[0])

    handles = []
    for mod in probe.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, SelfAttention):
            handles.append(mod.register_forward_hook(attention_hook))
    in_ch = getattr(getattr(model, "config", None), "in_channels", 3)
    with torch.no_grad():
        probe(torch.zeros(1, in_ch, size, size, device="meta"), torch.zeros(1, device="meta"))
    for handle in handles:
        handle.remove()
    return {"params": params, "macs": macs, "macs_per_pixel": macs / (size * size)}
