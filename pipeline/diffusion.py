"""Interpolation diffusion between a clean image x0 and its noisy photo xT.

Forward process (no Gaussian noise is added; the real noise of the photo is
the "terminal state"):

    D(x0, xT, t) = (1 - t/T) * x0 + (t/T) * xT,   t in {0, ..., T}

Training draws t from {1..T} and teaches S(D(x0, y, t), t/T) to return x0.
Sampling starts from the photo y at t = T and walks down a schedule of K
steps that is independent of the training T.

Sampler identity (why ``improved`` is stable): its update is

    x_{t'} = x_t - D(x0_hat, y, t) + D(x0_hat, y, t') = x_t + (t - t')/T * (x0_hat - y)

so, starting at x_T = y, the result is

    x_0 = y + sum_k (dt_k / T) * (x0_hat_k - y) = sum_k (dt_k / T) * x0_hat_k,

a weighted mean of the K predictions with weights dt_k / T that sum to one
(an exact mean when K divides T). ``origin`` instead returns the last
prediction alone. With a perfect denoiser every sampler returns x0 exactly,
and with K = 1 every sampler is ``direct``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "denoise_tiled",
    "degrade",
    "interpolate",
    "reconstruction_loss",
    "sample",
    "sample_timesteps",
    "timestep_schedule",
    "training_loss",
]

#: Anything with the UNet's signature: (x_t, t/T as a (B,) float tensor) -> x0_hat.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("origin", "improved", "direct")


def interpolate(x0: torch.Tensor, xT: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - alpha) * x0 + alpha * xT; a (B,) alpha is applied per example."""
    alpha = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device)
    if alpha.ndim == 1:
        alpha = alpha.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - alpha) * x0 + alpha * xT


def degrade(x0: torch.Tensor, xT: torch.Tensor, t: torch.Tensor | int, *, T: int) -> torch.Tensor:
    """D(x0, xT, t) for integer time t in [0, T] (scalar or (B,))."""
    t = torch.as_tensor(t, device=x0.device)
    return interpolate(x0, xT, t.to(x0.dtype) / T)


def sample_timesteps(
    batch: int,
    T: int,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times, uniform on {1..T} unless ``weights`` (length T, for t = 1..T) say otherwise.

    t = 0 is never drawn: there the input already is the target.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if weights is None:
        t = torch.randint(1, T + 1, (batch,), generator=generator)
    else:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (T,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {T} non-negative numbers with a positive sum")
        t = torch.multinomial(weights, batch, replacement=True, generator=generator) + 1
    return t.to(device) if device is not None else t


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "charbonnier", eps: float = 1e-3
) -> torch.Tensor:
    """Mean Charbonnier sqrt((x - y)^2 + eps^2) (a smooth L1), or plain L1 / L2."""
    if kind == "charbonnier":
        return torch.sqrt((pred - target) ** 2 + eps**2).mean()
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown loss kind {kind!r}; choose charbonnier, l1 or l2")


def training_loss(
    model: Denoiser,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    *,
    T: int,
    kind: str = "charbonnier",
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One-sample-per-example estimate of the training objective E_t ||S(D(x0, y, t), t/T) - x0||."""
    t = sample_timesteps(clean.shape[0], T, weights=weights, generator=generator, device=clean.device)
    x_t = degrade(clean, noisy, t, T=T)
    return reconstruction_loss(model(x_t, t.to(clean.dtype) / T), clean, kind=kind)


def timestep_schedule(T: int, steps: int) -> list[int]:
    """K + 1 distinct integer times from T down to 0, evenly spread.

    Neighbours are T/K >= 1 apart before rounding, so rounding never merges
    two of them and the schedule always has exactly ``steps`` steps.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {steps}")
    times = torch.linspace(T, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    assert len(set(times)) == steps + 1, times
    return times


@torch.no_grad()
def sample(
    model: Denoiser,
    y: torch.Tensor,
    *,
    T: int,
    steps: int | None = None,
    sampler: str = "improved",
) -> torch.Tensor:
    """Denoise the photo y (B, C, H, W) by walking t from T to 0 in ``steps`` steps.

    ``model`` is the UNet or any callable with its signature, e.g. an oracle
    returning the true x0 in tests. ``steps`` defaults to T; ``direct`` is a
    single call whatever ``steps`` says. See the module docstring for the
    update rules and the weighted-mean identity of ``improved``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    steps = T if steps is None else steps
    if sampler == "direct":
        steps = 1
    times = timestep_schedule(T, steps)

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), t / T, dtype=x.dtype, device=x.device))

    x = y
    for t, t_next in zip(times[:-1], times[1:]):
        x0_hat = predict(x, t)
        if sampler == "improved":
            x = x - degrade(x0_hat, y, t, T=T) + degrade(x0_hat, y, t_next, T=T)
        else:  # origin, and direct as its one-step case
            x = degrade(x0_hat, y, t_next, T=T)
    return x


def _tile_grid(length: int, tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """Tile size and start offsets covering [0, length) with at least ``overlap`` shared pixels.

    Uses the fewest tiles of at most ``tile`` pixels, then shrinks them to the
    smallest size (rounded up to ``multiple``) that still covers the side, so
    little compute is spent on overlap beyond what was asked for.
    """
    if length <= tile:
        return length, [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    size = min(tile, -(-size // multiple) * multiple)
    starts = torch.linspace(0, length - size, count, dtype=torch.float64).round().long().tolist()
    return size, starts


def _blend_window(size: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weights: a sin^2 ramp at edges shared with a neighbour, 1 elsewhere.

    The ramp starts at sin^2(pi/4 / ramp) > 0, so every pixel keeps a positive
    weight, and edges on the image border stay at full weight. Two facing
    ramps of the same length sum to one.
    """
    w = torch.ones(size, dtype=torch.float64)
    if ramp > 0:
        rise = torch.sin(0.5 * math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
        if not at_start:
            w[:ramp] = rise
        if not at_end:
            w[size - ramp :] = rise.flip(0)
    return w


@torch.no_grad()
def denoise_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int = 512,
    overlap: int = 32,
    batch: int = 4,
    multiple: int = 8,
) -> torch.Tensor:
    """Apply ``fn`` ((B, C, h, w) -> same shape) to an image of any size in overlapping tiles.

    Memory is bounded by ``batch`` tiles of at most ``tile`` x ``tile``
    (plus two image-sized float32 accumulators). Tiles are blended with a
    smooth positive window so seams do not show. ``image`` is (C, H, W) or
    (N, C, H, W); the result has the same shape, dtype and device.
    Extra compute over whole-image inference is about
    (tile / (tile - overlap))^2 - 1 for large images.
    """
    if overlap < 0 or tile <= overlap:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if image.ndim == 3:
        return denoise_tiled(fn, image[None], tile=tile, overlap=overlap, batch=batch, multiple=multiple)[0]
    if image.ndim != 4:
        raise ValueError(f"image must be (C, H, W) or (N, C, H, W), got {tuple(image.shape)}")

    n, c, height, width = image.shape
    th, ys = _tile_grid(height, tile, overlap, multiple)
    tw, xs = _tile_grid(width, tile, overlap, multiple)
    ramp_h, ramp_w = min(overlap, th // 2), min(overlap, tw // 2)
    boxes = []
    for iy, y0 in enumerate(ys):
        wy = _blend_window(th, ramp_h, iy == 0, iy == len(ys) - 1)
        for ix, x0 in enumerate(xs):
            wx = _blend_window(tw, ramp_w, ix == 0, ix == len(xs) - 1)
            boxes.append((y0, x0, (wy[:, None] * wx[None, :]).float().to(image.device)))

    out = torch.empty_like(image)
    for i in range(n):
        acc = torch.zeros(c, height, width, dtype=torch.float32, device=image.device)
        norm = torch.zeros(1, height, width, dtype=torch.float32, device=image.device)
        for b0 in range(0, len(boxes), batch):
            chunk = boxes[b0 : b0 + batch]
            tiles = torch.stack([image[i, :, y0 : y0 + th, x0 : x0 + tw] for y0, x0, _ in chunk])
            preds = fn(tiles)
            for (y0, x0, w), pred in zip(chunk, preds):
                acc[:, y0 : y0 + th, x0 : x0 + tw] += w * pred.float()
                norm[:, y0 : y0 + th, x0 : x0 + tw] += w
        out[i] = (acc / norm).to(image.dtype)
    return out
