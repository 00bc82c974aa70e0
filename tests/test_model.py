import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.model import PRESETS, ChannelNorm, ModelConfig, NAFBlock, ResBlock, UNet, build_model, local_mean, model_stats


def randomise_output(model: UNet, std: float = 0.05) -> UNet:
    """Leave the identity start so outputs depend on the whole network."""
    with torch.no_grad():
        model.out_conv.weight.normal_(0.0, std)
        model.out_conv.bias.normal_(0.0, std)
    return model


def test_presets_have_the_promised_scale():
    tiny, base = build_model("tiny"), build_model("base")
    tiny_stats, base_stats = model_stats(tiny), model_stats(base)
    assert 500_000 <= tiny_stats["params"] <= 1_500_000 and tiny_stats["macs_per_pixel"] < 50_000
    assert base_stats["params"] > 10 * tiny_stats["params"]
    assert tiny.config.block == base.config.block == "naf"
    assert not tiny.config.attention and not base.config.attention
    assert tiny.config is PRESETS["tiny"]
    assert build_model("tiny-res").config.block == "res" and build_model("base-res").config.attention


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), batch=st.integers(1, 2))
def test_untrained_model_is_identity_for_any_size(h, w, batch):
    torch.manual_seed(0)
    model = build_model("tiny")
    x = torch.rand(batch, 3, h, w)
    assert torch.equal(model(x, torch.rand(batch)), x)


@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 37), w=st.integers(1, 37))
def test_any_size_keeps_shape_once_output_is_nontrivial(h, w):
    torch.manual_seed(0)
    model = randomise_output(build_model("tiny", width=8, channel_mults=(1, 2)))
    x = torch.rand(1, 3, h, w)
    out = model(x, torch.tensor([0.5]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, x)


def test_time_reaches_every_residual_block():
    torch.manual_seed(0)
    model = randomise_output(build_model("tiny-res", width=8, attention=True))
    x = torch.rand(2, 3, 32, 32)
    model(x, torch.tensor([0.1, 0.9])).square().sum().backward()
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 2 * len(model.config.channel_mults) + 2
    assert all(b.time.weight.grad.abs().sum() > 0 for b in blocks)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.ones(2)))


def test_scalar_time_is_broadcast():
    torch.manual_seed(0)
    model = randomise_output(build_model("tiny", width=8))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, 0.3), model(x, torch.full((3,), 0.3)))


def test_build_model_overrides_and_rejects_unknown_names():
    model = build_model("base-res", width=8, attention=False)
    assert model.config == ModelConfig(width=8, channel_mults=(1, 2, 4, 8), blocks_per_level=2, attention=False)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")
    with pytest.raises(TypeError):
        build_model("tiny", depth=3)
    with pytest.raises(ValueError):
        ModelConfig(channel_mults=())


def test_config_round_trips_through_plain_dicts():
    config = PRESETS["base"]
    data = config.to_dict()
    assert isinstance(data["channel_mults"], list)
    assert ModelConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**data, "depth": 3})


def test_unet_accepts_keywords_or_a_config_not_both():
    assert UNet(width=8, channel_mults=(1,)).config == ModelConfig(width=8, channel_mults=(1,))
    with pytest.raises(TypeError):
        UNet(ModelConfig(), width=8)


def test_macs_match_a_hand_count_for_a_one_level_net():
    width, size = 8, 16
    model = UNet(width=width, channel_mults=(1,), blocks_per_level=1)
    px, w, t = size * size, width, 4 * width
    conv3 = lambda i, o: 9 * i * o * px  # noqa: E731
    resblock = lambda i, o: conv3(i, o) + conv3(o, o) + t * o + (i * o * px if i != o else 0)  # noqa: E731
    expected = (
        (w * t + t * t)  # time MLP
        + conv3(3, w)  # in_conv
        + resblock(w, w)  # encoder
        + 2 * resblock(w, w)  # middle
        + resblock(2 * w, w)  # decoder with skip
        + conv3(w, 3)  # out_conv
    )
    stats = model_stats(model, size=size)
    assert stats["macs"] == expected
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    assert stats["macs_per_pixel"] == expected / px


def test_macs_include_attention_matmuls():
    plain, attn = build_model("tiny-res", width=8), build_model("tiny-res", width=8, attention=True)
    size = 64
    lowest = size // plain.config.downsampling_factor
    channels = 8 * plain.config.channel_mults[-1]
    qkv_and_proj = 4 * channels * channels * lowest**2
    matmuls = 2 * lowest**4 * channels
    assert model_stats(attn, size)["macs"] - model_stats(plain, size)["macs"] == qkv_and_proj + matmuls


def test_model_stats_leaves_the_model_untouched():
    model = build_model("tiny", width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_stats(model, size=32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.Module) and m._forward_hooks for m in model.modules())


def brute_local_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """The definition: the mean over a window x window box shifted inside the image."""
    _, _, h, w = x.shape
    wh, ww = min(window, h), min(window, w)
    out = torch.empty_like(x)
    for i in range(h):
        y0 = min(max(i - wh // 2, 0), h - wh)
        for j in range(w):
            x0 = min(max(j - ww // 2, 0), w - ww)
            out[:, :, i, j] = x[:, :, y0:y0 + wh, x0:x0 + ww].mean(dim=(2, 3))
    return out


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), window=st.integers(1, 24))
def test_local_mean_is_the_mean_over_a_box_inside_the_image(h, w, window):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    out = local_mean(x, window)
    assert torch.allclose(out.expand_as(x), brute_local_mean(x, window), atol=1e-5)
    if h <= window and w <= window:  # a training patch: NAFNet's global mean
        assert out.shape == (2, 3, 1, 1)


def test_old_checkpoint_configs_load_as_resblock_unets():
    old = {"width": 16, "channel_mults": [1, 2, 4, 8], "blocks_per_level": 1, "attention": False,
           "in_channels": 3, "attention_heads": 4, "time_scale": 1000.0}
    config = ModelConfig.from_dict(old)
    assert config.block == "res"
    model = UNet(config)
    assert any(isinstance(m, ResBlock) for m in model.modules())
    assert not any(isinstance(m, NAFBlock) for m in model.modules())
    with pytest.raises(ValueError, match="unknown block"):
        ModelConfig(block="transformer")


def test_naf_configs_without_time_conditioning_load_with_the_shift_they_were_trained_with():
    old = {"width": 8, "channel_mults": [1, 2], "block": "naf", "pool_window": 64}
    config = ModelConfig.from_dict(old)
    assert (config.time_conditioning, config.channel_attention) == ("shift", "linear")
    assert (PRESETS["tiny"].time_conditioning, PRESETS["tiny"].channel_attention) == ("shift", "linear")
    blocks = [m for m in UNet(config).modules() if isinstance(m, NAFBlock)]
    assert all(b.time.out_features == 2 * b.conv2.out_channels for b in blocks)  # the saved weights' shapes
    scaled = [m for m in UNet(ModelConfig.from_dict({**old, "time_conditioning": "scale"})).modules()
              if isinstance(m, NAFBlock)]
    assert all(b.time.out_features == b.conv2.out_channels for b in scaled)
    with pytest.raises(ValueError, match="unknown time_conditioning"):
        ModelConfig(block="naf", time_conditioning="film")
    with pytest.raises(ValueError, match="unknown channel_attention"):
        ModelConfig(block="naf", channel_attention="softmax")


def test_without_the_output_norm_a_constant_channel_shifts_the_output_instead_of_erasing_the_image():
    """The plateau's mechanism: one huge constant channel makes the norm's output the same at every pixel."""
    assert PRESETS["tiny"].output_norm and ModelConfig.from_dict({"width": 8}).output_norm  # old checkpoints
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    residuals = {}
    for output_norm in (True, False):
        model = randomise_output(UNet(width=8, channel_mults=(1, 2), block="naf", output_norm=output_norm))
        assert isinstance(model.out_norm, ChannelNorm) == output_norm
        last = model.up_blocks[-1][-1]
        last.register_forward_hook(lambda module, args, out: out + torch.eye(8)[0].view(1, 8, 1, 1) * 1e4)
        with torch.no_grad():
            residual = model(x, 1.0) - x
        residuals[output_norm] = residual[..., 2:-2, 2:-2]          # away from the zero padding
    assert residuals[True].std(dim=(2, 3)).max() < 1e-3              # the same vector everywhere
    assert residuals[False].std(dim=(2, 3)).min() > 1e-2              # content still reaches the output


@pytest.mark.parametrize("variant", [{"time_conditioning": "shift", "channel_attention": "linear"},
                                     {"time_conditioning": "scale", "channel_attention": "sigmoid"},
                                     {"output_norm": False}])
def test_naf_unet_starts_as_identity_and_time_reaches_every_block(variant):
    torch.manual_seed(0)
    model = UNet(width=8, channel_mults=(1, 2), block="naf", **variant)
    x = torch.rand(2, 3, 20, 12)
    assert torch.equal(model(x, torch.rand(2)), x)
    randomise_output(model)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, NAFBlock):
                block.beta.normal_(0.0, 0.5)
                block.gamma.normal_(0.0, 0.5)
    model(x, torch.tensor([0.1, 0.9])).square().sum().backward()
    blocks = [m for m in model.modules() if isinstance(m, NAFBlock)]
    assert len(blocks) == 2 * len(model.config.channel_mults) + 2
    assert all(b.time.weight.grad.abs().sum() > 0 for b in blocks)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.ones(2)))


def test_naf_output_far_from_a_change_ignores_it():
    """Local channel statistics: a pixel does not see content beyond its receptive field and pool window."""
    torch.manual_seed(0)
    model = randomise_output(UNet(width=8, channel_mults=(1, 2), block="naf", pool_window=8))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, NAFBlock):
                block.beta.fill_(1.0)
                block.gamma.fill_(1.0)
        x = torch.rand(1, 3, 16, 96)
        changed = x.clone()
        changed[..., 80:] = torch.rand(1, 3, 16, 16)
        a, b = model(x, 0.5), model(changed, 0.5)
    assert torch.allclose(a[..., :24], b[..., :24])
    assert not torch.allclose(a[..., 80:], b[..., 80:])


def test_extra_mid_blocks_run_at_the_lowest_level_and_old_checkpoints_still_load():
    old = {"width": 8, "channel_mults": [1, 2], "block": "naf", "output_norm": False}
    config = ModelConfig.from_dict(old)
    assert config.mid_blocks == 2
    two = UNet(config)
    assert not any(key.startswith("mid_more") for key in two.state_dict())  # old state dicts load as they are
    four = UNet(ModelConfig.from_dict({**old, "mid_blocks": 4}))
    assert len(four.mid_more) == 2 and all(b.conv2.out_channels == 16 for b in four.mid_more)
    four.load_state_dict({**four.state_dict(), **two.state_dict()})
    randomise_output(four)
    x = torch.rand(1, 3, 16, 16)
    before = four(x, torch.tensor([1.0]))
    with torch.no_grad():
        for p in four.mid_more.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(before, four(x, torch.tensor([1.0])))  # the extra blocks are on the path
    with pytest.raises(ValueError, match="mid_blocks"):
        ModelConfig(mid_blocks=1)
