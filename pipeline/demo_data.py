"""Datasets that need no download, for demos, end-to-end tests and judging: scikit-image's photos.

The clean images are the natural photos scikit-image ships inside its wheel, split once into
photos for training, for validation and for the test set (docs/data.md says why each is where):
no photo is in two roles. Validation and test are *blocks*: each photo gets camera noise at a
few fixed noise levels, and square blocks are cut from it, enough that the mean PSNR over them
moves by less than its standard error only when the model really changed
(:func:`psnr_summary`). Validation uses the training camera (:data:`pipeline.noise.TRAIN_CAMERA`);
the test set the held-out one (:data:`pipeline.noise.TEST_CAMERA`). Everything is reproducible
from ``seed``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import skimage.data
import skimage.transform

from pipeline.images import encode_png, to_float, to_uint8
from pipeline.noise import TEST_CAMERA, TRAIN_CAMERA, CameraModel, sample_camera, synthesize_pair

# The split of the bundled photos (colour first, then gray). skimage's `cat` is `chelsea` and
# `clock_motion` is `clock`, so neither appears twice; `horse`, `logo`, `colorwheel`, the
# chessboards and `microaneurysms` (102 px) are not natural photos or too small.
TRAIN_PHOTOS = ("astronaut", "coffee", "immunohistochemistry", "retina",
                "camera", "brick", "grass", "text", "moon")
VAL_PHOTOS = ("chelsea", "hubble_deep_field", "gravel", "clock", "coins")
TEST_PHOTOS = ("rocket", "stereo_motorcycle", "page", "cell")
# Kept for callers that want "the demo photos": the training ones.
DEMO_IMAGES = TRAIN_PHOTOS
PHOTO_SIZE = 384  # long side the photos are downscaled to
# Raw shot-noise levels of the validation and test blocks (read noise follows each camera's law):
# about 32, 26 and 20 dB of noisy sRGB PSNR on the validation blocks (docs/data.md).
SHOT_LEVELS = (5e-4, 2e-3, 8e-3)
VAL_BLOCK, VAL_BLOCKS = 64, 24    # side, and blocks per (photo, level)
TEST_BLOCK, TEST_BLOCKS, TEST_PHOTO_SIZE = 64, 32, 512
LEAVES_IMAGES = 24  # procedural dead-leaves images of the leaves: source, every second one gray
LEAVES_SEED = 7  # their content is fixed, like the bundled photos'; ingest --seed draws only the noise


def demo_image(name: str, size: int | None = None) -> np.ndarray:
    """A bundled photo as H x W x 3 uint8, downscaled so its long side is <= size."""
    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = pixels[:, :, :3]
    if size is not None and max(pixels.shape[:2]) > size:
        scale = size / max(pixels.shape[:2])
        shape = (max(1, round(pixels.shape[0] * scale)), max(1, round(pixels.shape[1] * scale)))
        pixels = to_uint8(skimage.transform.resize(to_float(pixels), shape, anti_aliasing=True))
    return np.ascontiguousarray(pixels)


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def demo_pairs(
    *, variants: int = 2, size: int | None = None, seed: int = 0, names: tuple[str, ...] = DEMO_IMAGES
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, clean_u8, noisy_u8)`` for every bundled photo and noise variant (training camera).

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


def noise_blocks(names: tuple[str, ...], *, model: CameraModel, block: int, blocks: int,
                 levels: tuple[float, ...] = SHOT_LEVELS, size: int | None = PHOTO_SIZE,
                 seed: int = 0) -> list[dict]:
    """Blocks of noisy photos at fixed noise levels: {"key", "clean", "noisy" (uint8), "meta"}.

    Each (photo, level) is one camera from ``model`` with its shot noise pinned to the level,
    applied to the whole photo (so demosaic and JPEG see real context); ``blocks`` of the
    photo's non-overlapping ``block`` x ``block`` tiles are kept, the same tiles at every level.
    Keys are ``<photo>_l<level>_b<nn>``; a photo gives at most as many blocks as it has tiles.
    """
    out = []
    for name in names:
        photo = to_float(demo_image(name, size))
        rows, cols = photo.shape[0] // block, photo.shape[1] // block
        tiles = np.random.default_rng([seed, _name_seed(name)]).permutation(rows * cols)[:blocks]
        for level_index, shot in enumerate(levels):
            rng = np.random.default_rng([seed, _name_seed(name), level_index])
            params = sample_camera(rng, model, shot=shot)
            target, noisy, _ = synthesize_pair(photo, rng, params, model=model)
            for number, tile in enumerate(sorted(int(t) for t in tiles)):
                y, x = (tile // cols) * block, (tile % cols) * block
                cut = (slice(y, y + block), slice(x, x + block))
                out.append({"key": f"{name}_l{level_index}_b{number:02d}", "clean": to_uint8(target[cut]),
                            "noisy": to_uint8(noisy[cut]),
                            "meta": {"photo": name, "level": level_index, "block": [y, x, block],
                                     "camera": params}})
    return out


def validation_blocks(*, seed: int = 0, names: tuple[str, ...] = VAL_PHOTOS, block: int = VAL_BLOCK,
                      blocks: int = VAL_BLOCKS) -> list[dict]:
    """The validation set: validation photos, training camera, :data:`SHOT_LEVELS`."""
    return noise_blocks(names, model=TRAIN_CAMERA, block=block, blocks=blocks, seed=seed)


def test_blocks(*, seed: int = 0, names: tuple[str, ...] = TEST_PHOTOS, block: int = TEST_BLOCK,
                blocks: int = TEST_BLOCKS) -> list[dict]:
    """The test set: test photos, the held-out test camera, :data:`SHOT_LEVELS`."""
    return noise_blocks(names, model=TEST_CAMERA, block=block, blocks=blocks, size=TEST_PHOTO_SIZE, seed=seed)


test_blocks.__test__ = False  # not a pytest test, despite the name


def psnr_summary(psnrs, strata=None) -> dict:
    """Mean PSNR over blocks and its standard error: plain (sd / sqrt n) and, given each block's
    stratum (photo, level), stratified (the strata are fixed by design, so only the spread of
    blocks within a stratum is sampling noise)."""
    values = np.asarray(psnrs, np.float64)
    summary = {"blocks": int(values.size), "mean": float(values.mean()),
               "standard_error": float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else None}
    if strata is not None:
        labels = np.asarray([str(s) for s in strata])
        groups = [values[labels == label] for label in np.unique(labels)]
        if all(g.size > 1 for g in groups):
            weights = np.array([g.size for g in groups]) / values.size
            variance = sum(w**2 * g.var(ddof=1) / g.size for w, g in zip(weights, groups))
            summary["stratified_standard_error"] = float(np.sqrt(variance))
    return summary


def write_demo_tree(
    folder: str | Path,
    layout: str = "mirrored",
    *,
    variants: int = 2,
    size: int | None = PHOTO_SIZE,
    seed: int = 0,
    names: tuple[str, ...] = DEMO_IMAGES,
) -> list[str]:
    """Write demo photos as PNGs the ingest job can read; returns the keys written.

    ``mirrored`` writes ``clean/<key>.png`` and ``noisy/<key>.png``; ``clean``
    writes each photo once as ``<name>.png`` (noise is synthesized later).
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


def dead_leaves(rng: np.random.Generator, size: int = PHOTO_SIZE, *, min_radius: float = 8.0,
                exponent: float = 1.5, shading: float = 0.5, max_disks: int = 5000) -> np.ndarray:
    """A procedural clean image, H x W x 3 float32 in [0, 1]: the dead-leaves model.

    Disks of random colour fall front to back until the plane is covered; radii follow a power
    law, ``P(r > x) = (min_radius / x) ** exponent`` (capped at half the side), and each disk is
    shaded by a random linear ramp (``shading`` is its largest change across a radius, as a
    fraction). Large flat or smoothly shaded regions and sharp edges in every colour and
    brightness: what a few training photos lack (a dark blue sky, docs/evaluation.md). Scenes of
    this kind train denoisers close to natural photos (Achddou et al., "Synthetic images as a
    regularity prior for image restoration neural networks", 2021). Draws from ``rng`` in a
    fixed order, so a seed gives the same image.
    """
    from scipy.ndimage import gaussian_filter

    out = np.zeros((size, size, 3), np.float32)
    free = np.ones((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(max_disks):
        radius = min(size / 2, min_radius * rng.uniform(1e-3, 1.0) ** (-1 / exponent))
        cy, cx = rng.uniform(-radius, size + radius, 2)
        y0, y1 = int(max(0, cy - radius)), int(min(size, cy + radius + 1))
        x0, x1 = int(max(0, cx - radius)), int(min(size, cx + radius + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        inside = (dy**2 + dx**2 <= radius**2) & free[y0:y1, x0:x1]
        if not inside.any():
            continue
        colour = rng.uniform(0, 1, 3).astype(np.float32) ** rng.uniform(0.5, 2.0)
        slope = rng.normal(0, shading / max(radius, 1.0), 2).astype(np.float32)
        shade = 1 + slope[0] * dy + slope[1] * dx
        out[y0:y1, x0:x1][inside] = colour[None, :] * shade[inside][:, None]
        free[y0:y1, x0:x1][inside] = False
        if not free.any():
            break
    return np.clip(gaussian_filter(out, (0.7, 0.7, 0)), 0, 1).astype(np.float32)  # edges as a lens softens them


def leaves_images(*, seed: int = LEAVES_SEED, count: int = LEAVES_IMAGES,
                  size: int = PHOTO_SIZE) -> list[tuple[str, np.ndarray]]:
    """``(key, uint8 image)`` of the leaves: source. Every second image is made gray (its luma),
    so colour scenes do not outweigh the gray photos a model also meets. Each image has its own
    generator, so ``count`` does not change the images before it."""
    images = []
    for index in range(count):
        image = dead_leaves(np.random.default_rng([seed, index]), size)
        if index % 2:
            image = np.repeat(image @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(image.shape)
        images.append((f"leaves_{index:02d}", to_uint8(image)))
    return images
