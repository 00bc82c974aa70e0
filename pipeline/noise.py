"""Realistic camera noise for clean-only photos.

Follows Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019):
an sRGB image is taken back to linear raw (inverse tone curve, inverse gamma,
inverse colour correction, inverse white balance and brightening), mosaicked to an
RGGB Bayer plane, given Poisson-Gaussian noise (variance = shot * x + read), then
demosaicked and processed forward again with the same camera.  Noise added in raw
becomes spatially correlated and signal-dependent in sRGB, like a real camera's.

Everything is float32 numpy, seeded only through the ``np.random.Generator`` passed
in, so a seed reproduces the exact same noisy image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# XYZ -> camera matrices of four cameras, from the paper's reference code.
XYZ_TO_CAMERA = np.array(
    [
        [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
        [[0.4913, -0.0541, -0.0202], [-0.613, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
        [[0.838, -0.263, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
        [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.097, 0.1581, 0.5181]],
    ]
)
SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
GAMMA = 2.2
RED_GAIN_RANGE = (1.9, 2.4)
BLUE_GAIN_RANGE = (1.5, 1.9)
SHOT_NOISE_RANGE = (1e-4, 1.2e-2)
HIGHLIGHT_INFLECTION = 0.9


@dataclass(frozen=True)
class CameraParams:
    """One sampled camera: colour pipeline and noise levels."""

    rgb_to_camera: tuple[tuple[float, float, float], ...]
    rgb_gain: float
    red_gain: float
    blue_gain: float
    shot_noise: float
    read_noise: float

    @property
    def rgb_to_camera_matrix(self) -> np.ndarray:
        return np.asarray(self.rgb_to_camera, dtype=np.float32)

    @property
    def camera_to_rgb_matrix(self) -> np.ndarray:
        return np.linalg.inv(np.asarray(self.rgb_to_camera, dtype=np.float64)).astype(np.float32)

    def as_dict(self) -> dict:
        """Plain JSON-able values, for recording next to a synthesized pair."""
        return asdict(self)


def sample_camera_params(rng: np.random.Generator) -> CameraParams:
    """Draw a camera as the paper does: random CCM, gains and noise levels."""
    weights = rng.uniform(1e-8, 1e8, size=(len(XYZ_TO_CAMERA), 1, 1))
    xyz_to_camera = (XYZ_TO_CAMERA * weights).sum(axis=0) / weights.sum()
    rgb_to_camera = xyz_to_camera @ SRGB_TO_XYZ
    rgb_to_camera /= rgb_to_camera.sum(axis=1, keepdims=True)  # keep gray gray

    rgb_gain = 1.0 / rng.normal(0.8, 0.1)
    red_gain = rng.uniform(*RED_GAIN_RANGE)
    blue_gain = rng.uniform(*BLUE_GAIN_RANGE)

    log_shot = rng.uniform(np.log(SHOT_NOISE_RANGE[0]), np.log(SHOT_NOISE_RANGE[1]))
    log_read = 2.18 * log_shot + 1.20 + rng.normal(0.0, 0.26)
    return CameraParams(
        rgb_to_camera=tuple(tuple(float(v) for v in row) for row in rgb_to_camera),
        rgb_gain=float(rgb_gain),
        red_gain=float(red_gain),
        blue_gain=float(blue_gain),
        shot_noise=float(np.exp(log_shot)),
        read_noise=float(np.exp(log_read)),
    )


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return 3.0 * x**2 - 2.0 * x**3


def _inverse_smoothstep(y: np.ndarray) -> np.ndarray:
    y = np.clip(y, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)


def _apply_matrix(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return rgb @ matrix.T.astype(np.float32)


def _white_balance_gains(params: CameraParams) -> np.ndarray:
    """Per-channel gains the camera applies going forward (R, G, B)."""
    return np.array([params.red_gain, 1.0, params.blue_gain], np.float32) * np.float32(params.rgb_gain)


def _safe_inverse_gains(linear: np.ndarray, params: CameraParams) -> np.ndarray:
    # Dividing bright pixels by the gains would turn clipped whites gray; the paper
    # fades the gains to 1 above the inflection point so highlights stay saturated.
    inverse = 1.0 / _white_balance_gains(params)
    gray = linear.mean(axis=-1, keepdims=True)
    mask = (np.maximum(gray - HIGHLIGHT_INFLECTION, 0.0) / (1.0 - HIGHLIGHT_INFLECTION)) ** 2
    safe = np.maximum(mask + (1.0 - mask) * inverse, inverse)
    return linear * safe


def mosaic(camera_rgb: np.ndarray) -> np.ndarray:
    """RGGB Bayer plane (H x W) of an H x W x 3 image; H and W must be even."""
    height, width, _ = camera_rgb.shape
    if height % 2 or width % 2:
        raise ValueError(f"mosaic needs even height and width, got {height}x{width}")
    bayer = np.empty((height, width), camera_rgb.dtype)
    bayer[0::2, 0::2] = camera_rgb[0::2, 0::2, 0]
    bayer[0::2, 1::2] = camera_rgb[0::2, 1::2, 1]
    bayer[1::2, 0::2] = camera_rgb[1::2, 0::2, 1]
    bayer[1::2, 1::2] = camera_rgb[1::2, 1::2, 2]
    return bayer


def _bayer_masks(height: int, width: int) -> np.ndarray:
    masks = np.zeros((height, width, 3), np.float32)
    masks[0::2, 0::2, 0] = 1
    masks[0::2, 1::2, 1] = 1
    masks[1::2, 0::2, 1] = 1
    masks[1::2, 1::2, 2] = 1
    return masks


def demosaic(bayer: np.ndarray) -> np.ndarray:
    """Bilinear demosaicking of an RGGB plane to H x W x 3.

    Each missing sample is the mean of its nearest same-colour neighbours and
    measured samples are kept.  Simple and soft at sharp edges, which is acceptable
    for noise synthesis.  Mirror padding keeps the RGGB phase at the borders.
    """
    height, width = bayer.shape
    masks = _bayer_masks(height, width)
    corners, edge, centre = 0.25, 0.5, 1.0
    red_blue = np.array([[corners, edge, corners], [edge, centre, edge], [corners, edge, corners]])
    green = np.array([[0.0, edge, 0.0], [edge, centre, edge], [0.0, edge, 0.0]])
    kernels = np.stack([red_blue, green, red_blue], axis=-1).astype(np.float32)
    samples = np.pad(bayer[:, :, None] * masks, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    weights = np.pad(masks, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    total = np.zeros((height, width, 3), np.float32)
    weight = np.zeros((height, width, 3), np.float32)
    for dy in range(3):
        for dx in range(3):
            total += kernels[dy, dx] * samples[dy : dy + height, dx : dx + width]
            weight += kernels[dy, dx] * weights[dy : dy + height, dx : dx + width]
    return total / weight


def unprocess(rgb: np.ndarray, params: CameraParams, *, bayer: bool = True) -> np.ndarray:
    """sRGB float H x W x 3 in [0, 1] to linear raw.

    Returns the RGGB Bayer plane (H x W) by default, or the linear camera-RGB
    image (H x W x 3) with ``bayer=False``.
    """
    linear = np.maximum(_inverse_smoothstep(np.asarray(rgb, np.float32)), 1e-8) ** GAMMA
    camera = _apply_matrix(linear, params.rgb_to_camera_matrix)
    camera = np.clip(_safe_inverse_gains(camera, params), 0.0, 1.0).astype(np.float32)
    return mosaic(camera) if bayer else camera


def process(raw: np.ndarray, params: CameraParams) -> np.ndarray:
    """Linear raw (Bayer H x W, or camera RGB H x W x 3) back to sRGB in [0, 1]."""
    gains = _white_balance_gains(params)
    if raw.ndim == 2:
        camera = demosaic(np.clip(raw * (_bayer_masks(*raw.shape) @ gains), 0.0, 1.0))
    else:
        camera = np.clip(raw * gains, 0.0, 1.0)
    linear = np.clip(_apply_matrix(camera, params.camera_to_rgb_matrix), 0.0, 1.0)
    srgb = _smoothstep(np.maximum(linear, 1e-8) ** (1.0 / GAMMA))
    return np.clip(srgb, 0.0, 1.0).astype(np.float32)


def add_raw_noise(raw: np.ndarray, shot: float, read: float, rng: np.random.Generator) -> np.ndarray:
    """Heteroscedastic Gaussian approximation of Poisson-Gaussian sensor noise.

    Variance is ``shot * x + read``; the result is not clipped, so the variance is
    exactly the model's (``process`` clips later, as the camera would).
    """
    raw = np.asarray(raw, np.float32)
    std = np.sqrt(np.maximum(shot * raw + read, 0.0)).astype(np.float32)
    return raw + std * rng.standard_normal(raw.shape, dtype=np.float32)


def synthesize_camera_noise(
    rgb: np.ndarray, rng: np.random.Generator, params: CameraParams | None = None
) -> tuple[np.ndarray, CameraParams]:
    """Noisy version of a clean sRGB float image, and the camera that made it.

    Odd sizes are mirror-padded to even for the Bayer pattern and cropped back.
    """
    _, noisy, params = synthesize_pair(rgb, rng, params)
    return noisy, params


def synthesize_pair(
    rgb: np.ndarray, rng: np.random.Generator, params: CameraParams | None = None
) -> tuple[np.ndarray, np.ndarray, CameraParams]:
    """``(clean target, noisy, camera)`` that differ by sensor noise only.

    The target is the same image sent through the same camera with zero noise, so the
    softening of the bilinear demosaic is in both sides and a model trained on the pair
    learns denoising, not sharpening (as Brooks et al. train on noiseless raw targets).
    """
    rgb = np.asarray(rgb, np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 image, got shape {rgb.shape}")
    if params is None:
        params = sample_camera_params(rng)
    height, width, _ = rgb.shape
    padded = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="reflect")
    raw = unprocess(padded, params)
    noisy_raw = add_raw_noise(raw, params.shot_noise, params.read_noise, rng)
    crop = (slice(0, height), slice(0, width))
    return process(raw, params)[crop], process(noisy_raw, params)[crop], params
