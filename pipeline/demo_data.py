"""A small paired dataset that needs no download, for demos and end-to-end tests.

The clean images are the natural photos scikit-image ships inside its wheel; the
noisy ones are made by :func:`pipeline.noise.synthesize_pair`, one camera
per variant.  Everything is reproducible from ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
import skimage.transform

from pipeline.images import encode_png, to_float, to_uint8
from pipeline.noise import synthesize_pair

# Photos bundled with scikit-image (no network needed); the grayscale ones last.
DEMO_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
)


def demo_image(name: str, size: int | None = None) -> np.ndarray:
    """A bundled photo as H x W x 3 uint8, downscaled so its long side is <= size."""
    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = pixels[:, :, :3]
    if size is not None and max(pixels.shape[:2]) > size:
        scale = size / max(pixels.shape[:2])
        shape = (max(1, round(pixels.shape[0] * scale)), max(1, round(pixels.shape[1] * scale)))
        pixels = to_uint8(skimage.transform.resize(to_float(pixels), shape, anti_aliasing=True))
    return np.ascontiguousarray(pixels)


def demo_pairs(
    *, variants: int = 2, size: int | None = None, seed: int = 0, names: tuple[str, ...] = DEMO_IMAGES
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, clean_u8, noisy_u8)`` for every bundled photo and noise variant.

    Each (photo, variant) gets its own generator, so adding photos or variants
    leaves the existing pairs unchanged.
    """
    pairs = []
    for index, name in enumerate(names):
        clean = demo_image(name, size)
        for variant in range(variants):
            rng = np.random.default_rng([seed, index, variant])
            target, noisy, _ = synthesize_pair(to_float(clean), rng)
            pairs.append((f"{name}_{variant}", to_uint8(target), to_uint8(noisy)))
    return pairs


def write_demo_tree(
    folder: str | Path,
    layout: str = "mirrored",
    *,
    variants: int = 2,
    size: int | None = 384,
    seed: int = 0,
    names: tuple[str, ...] = DEMO_IMAGES,
) -> list[str]:
    """Write the demo set as PNGs the ingest job can read; returns the keys written.

    ``mirrored`` writes ``clean/<key>.png`` and ``noisy/<key>.png``; ``clean``
    writes each photo once as ``<name>.png`` for noise synthesis at ingest time.
    """
    folder = Path(folder)
    if layout == "mirrored":
        pairs = demo_pairs(variants=variants, size=size, seed=seed, names=names)
        for side in ("clean", "noisy"):
            (folder / side).mkdir(parents=True, exist_ok=True)
        for key, clean, noisy in pairs:
            (folder / "clean" / f"{key}.png").write_bytes(encode_png(clean))
            (folder / "noisy" / f"{key}.png").write_bytes(encode_png(noisy))
        return [key for key, _, _ in pairs]
    if layout == "clean":
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / f"{name}.png").write_bytes(encode_png(demo_image(name, size)))
        return list(names)
    raise ValueError(f"demo layout must be 'mirrored' or 'clean', got {layout!r}")
