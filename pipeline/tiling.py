"""Run an image-to-image function on an image of any size in overlapping, blended tiles.

Keeps memory bounded for large photos: the batch job and the evaluation call it through
``Denoiser.denoise``; see docs/method.md for its cost and how far it departs from one
whole-image pass.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["denoise_tiled", "geometric_self_ensemble"]


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


def geometric_self_ensemble(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` averaged over the 8 flips and quarter turns of the image plane (each undone on its
    output): a denoiser's errors that do not turn with the image partly cancel, for 8x the
    calls. Equals ``fn`` for an ``fn`` that commutes with them (docs/method.md). Arguments after
    the image (a model's time) are passed to every call unchanged."""

    def averaged(x: torch.Tensor, *args) -> torch.Tensor:
        total = None
        for flip in (False, True):
            flipped = x.flip(-1) if flip else x
            for turns in range(4):
                out = torch.rot90(fn(torch.rot90(flipped, turns, dims=(-2, -1)), *args), -turns, dims=(-2, -1))
                out = out.flip(-1) if flip else out
                total = out.float() if total is None else total + out.float()
        return (total / 8).to(x.dtype)

    return averaged


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

    The result equals ``fn(image)`` only for a pointwise ``fn``. A convolutional
    network differs where its receptive field reaches past a tile, and one with
    global attention (``attention=True``, the ``base`` preset) differs
    everywhere, since each tile attends only within itself.
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
