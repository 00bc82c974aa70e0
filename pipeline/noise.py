"""Camera noise for clean-only photos, with a new random camera per sample.

Follows Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019): an sRGB
image is taken back to linear raw (inverse tone curve, inverse gamma, inverse colour
correction, inverse white balance and brightening), mosaicked to an RGGB Bayer plane, given
sensor noise, then demosaicked and processed forward again by the same camera. The sensor
noise follows Wei et al., "A Physics-based Noise Formation Model for Extreme Low-light Raw
Denoising" (ELD, CVPR 2020): Poisson shot noise, heavy-tailed read noise, row (banding) noise
and ADC quantization. Noise added in raw becomes spatially correlated, signal-dependent and
colour-dependent in sRGB, like a real camera's.

Everything a camera can be is a :class:`CameraModel` (ranges); one draw from it is a plain
``dict`` of parameters (:func:`sample_camera`), recorded next to the pair it made. Two models:
:data:`TRAIN_CAMERA`, wide, for training and validation, and :data:`TEST_CAMERA`, built
differently (other colour matrices, gains, tone curve family, noise tails, banding direction,
demosaic, read-noise law), for a test set that judges generalization to an unseen camera.

Float32 numpy only, seeded only through the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import correlate

# ---------------------------------------------------------------- ranges and their sources

# XYZ -> camera matrices of four cameras, from Brooks et al.'s reference code; a random convex
# mix of them is one camera's colour response (as the paper samples it).
TRAIN_XYZ_TO_CAMERA = (
    ((1.0234, -0.2969, -0.2266), (-0.5625, 1.6328, -0.0469), (-0.0703, 0.2188, 0.6406)),
    ((0.4913, -0.0541, -0.0202), (-0.613, 1.3513, 0.2906), (-0.1564, 0.2151, 0.7183)),
    ((0.838, -0.263, -0.0639), (-0.2887, 1.0725, 0.2496), (-0.0627, 0.1427, 0.5438)),
    ((0.6596, -0.2079, -0.0562), (-0.4782, 1.3016, 0.1933), (-0.097, 0.1581, 0.5181)),
)
# Three other cameras, none in the training mix: dcraw's adobe_coeff table (Adobe DNG
# ColorMatrix2, D65, divided by 10000) for the Canon EOS 5D Mark III, Nikon D810, Fujifilm X-T1.
TEST_XYZ_TO_CAMERA = (
    ((0.6722, -0.0635, -0.0963), (-0.4287, 1.2460, 0.2028), (-0.0908, 0.2162, 0.5668)),
    ((0.9369, -0.3195, -0.0791), (-0.4488, 1.2430, 0.2301), (-0.0893, 0.1796, 0.6872)),
    ((0.8458, -0.2451, -0.0855), (-0.4597, 1.2447, 0.2407), (-0.1475, 0.2482, 0.6526)),
)
SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])

# Brightness: Brooks et al. draw the global gain as 1 / N(0.8, 0.1). Kept for both models.
BRIGHTNESS_MEAN, BRIGHTNESS_STD = 0.8, 0.1
# White balance: Brooks et al. draw red in [1.9, 2.4] and blue in [1.5, 1.9] (daylight).
# Training widens both by ~0.3 each way to cover other illuminants; the test camera is
# tungsten-like instead (low red, high blue gains), mostly outside Brooks's ranges.
TRAIN_RED_GAIN, TRAIN_BLUE_GAIN = (1.6, 2.7), (1.2, 2.2)
TEST_RED_GAIN, TEST_BLUE_GAIN = (1.3, 1.8), (1.9, 2.6)
# Tone curve: Brooks et al. use a fixed smoothstep after a fixed 2.2 gamma. Training draws a
# blend (1 - s) x + s smoothstep(x) with s in [0, 1] after a power-law gamma in [1.8, 2.6]
# (our range around 2.2). The test camera uses another family: the exact sRGB transfer
# function (IEC 61966-2-1) followed by a logistic S-curve of contrast c.
TRAIN_TONE_STRENGTH, TRAIN_GAMMA = (0.0, 1.0), (1.8, 2.6)
TEST_TONE_CONTRAST = (3.0, 6.0)
# Shot and read noise (raw variance = shot * x + read). Brooks et al. draw log(shot) uniform in
# [log 1e-4, log 1.2e-2] and log(read) = 2.18 log(shot) + 1.20 + N(0, 0.26), fitted to the
# Darmstadt (DND) cameras. Training keeps that law and extends shot to 2e-2, towards the
# high-ISO smartphone captures of SIDD (Abdelhamed et al., CVPR 2018), which are noisier than
# the DND range; the jitter is widened to 0.35. The test camera gets its own law: more read
# noise relative to shot at low gain, as small-pixel phone sensors show.
TRAIN_SHOT = (1e-4, 2e-2)
TRAIN_READ_LAW = (2.18, 1.20, 0.35)  # slope, intercept, std of the jitter, in log space
TEST_SHOT = (3e-4, 2e-2)
TEST_READ_LAW = (1.90, -0.30, 0.20)
# Read-noise tails: Wei et al. (ELD) find read noise heavier-tailed than Gaussian and model it
# with a Tukey-lambda distribution; lambda 0.14 is close to Gaussian, smaller is heavier
# (variance is finite above -0.5). The test camera uses a Student-t (another family) with
# 3-6 degrees of freedom.
TRAIN_TUKEY_LAMBDA = (-0.25, 0.14)
TEST_STUDENT_DOF = (3.0, 6.0)
# Banding: ELD models a per-row offset (row noise); its std here is a fraction of the read
# std, log-uniform over our range [0.02, 0.3]. The test camera bands along columns instead.
TRAIN_BANDING, TEST_BANDING = (0.02, 0.3), (0.02, 0.3)
# ADC: ELD's quantization noise comes from the ADC's bit depth; raw is rounded to 2**bits - 1
# levels (10-14 bit sensors, ours).
TRAIN_ADC_BITS, TEST_ADC_BITS = (10, 12, 14), (12,)
# Demosaicking: bilinear (Brooks et al.) and Malvar-He-Cutler (ICASSP 2004) for training;
# an edge-directed, gradient-corrected interpolation (Hamilton-Adams style) for the test camera.
TRAIN_DEMOSAIC, TEST_DEMOSAIC = ("bilinear", "malvar"), ("edge",)
# JPEG: cameras and phones deliver compressed sRGB. Probability and quality ranges are ours.
TRAIN_JPEG_PROBABILITY, TRAIN_JPEG_QUALITY = 0.3, (60, 98)
TEST_JPEG_PROBABILITY, TEST_JPEG_QUALITY = 0.5, (75, 95)
# Brooks et al. fade the inverse white balance to 1 above this gray level, keeping highlights white.
HIGHLIGHT_INFLECTION = 0.9


@dataclass(frozen=True)
class CameraModel:
    """The ranges one camera is drawn from (see the module constants for their sources)."""

    name: str
    xyz_to_camera: tuple
    red_gain: tuple[float, float]
    blue_gain: tuple[float, float]
    tone: str  # "smoothstep": gamma then a smoothstep blend; "srgb-sigmoid": sRGB then an S-curve
    tone_shape: tuple[float, float]  # smoothstep strength s, or the S-curve contrast c
    gamma: tuple[float, float] | None  # power-law gamma ("smoothstep" family only)
    shot: tuple[float, float]  # log-uniform
    read_law: tuple[float, float, float]
    tails: str  # "tukey" or "student"
    tail_shape: tuple[float, float]  # Tukey lambda or Student-t degrees of freedom
    banding: str  # "rows" or "columns"
    banding_ratio: tuple[float, float]  # banding std / read std, log-uniform
    adc_bits: tuple[int, ...]
    demosaic: tuple[str, ...]
    jpeg_probability: float
    jpeg_quality: tuple[int, int]

    def ranges(self) -> dict:
        """Plain JSON-able ranges, for the dataset card."""
        return asdict(self)


TRAIN_CAMERA = CameraModel(
    name="train", xyz_to_camera=TRAIN_XYZ_TO_CAMERA, red_gain=TRAIN_RED_GAIN, blue_gain=TRAIN_BLUE_GAIN,
    tone="smoothstep", tone_shape=TRAIN_TONE_STRENGTH, gamma=TRAIN_GAMMA, shot=TRAIN_SHOT,
    read_law=TRAIN_READ_LAW, tails="tukey", tail_shape=TRAIN_TUKEY_LAMBDA, banding="rows",
    banding_ratio=TRAIN_BANDING, adc_bits=TRAIN_ADC_BITS, demosaic=TRAIN_DEMOSAIC,
    jpeg_probability=TRAIN_JPEG_PROBABILITY, jpeg_quality=TRAIN_JPEG_QUALITY)
TEST_CAMERA = CameraModel(
    name="test", xyz_to_camera=TEST_XYZ_TO_CAMERA, red_gain=TEST_RED_GAIN, blue_gain=TEST_BLUE_GAIN,
    tone="srgb-sigmoid", tone_shape=TEST_TONE_CONTRAST, gamma=None, shot=TEST_SHOT,
    read_law=TEST_READ_LAW, tails="student", tail_shape=TEST_STUDENT_DOF, banding="columns",
    banding_ratio=TEST_BANDING, adc_bits=TEST_ADC_BITS, demosaic=TEST_DEMOSAIC,
    jpeg_probability=TEST_JPEG_PROBABILITY, jpeg_quality=TEST_JPEG_QUALITY)
CAMERA_MODELS = {"train": TRAIN_CAMERA, "test": TEST_CAMERA}


def camera_model(name: str) -> CameraModel:
    """A camera model by name, with a clear error for an unknown one."""
    try:
        return CAMERA_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown camera model {name!r}; expected one of {', '.join(CAMERA_MODELS)}") from None


def test_camera() -> CameraModel:
    """The held-out camera of the test set: never used for training or validation."""
    return TEST_CAMERA


test_camera.__test__ = False  # not a pytest test, despite the name


# ---------------------------------------------------------------- one camera

def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def read_for_shot(shot: float, law: tuple[float, float, float], jitter: float) -> float:
    """Read-noise variance tied to the shot noise by a log-linear law, plus ``jitter`` (in std units)."""
    slope, intercept, spread = law
    return float(np.exp(slope * np.log(shot) + intercept + spread * jitter))


def sample_camera(rng: np.random.Generator, model: CameraModel = TRAIN_CAMERA, *,
                  shot: float | None = None) -> dict:
    """One random camera as plain values; ``shot`` pins the noise level (read follows its law).

    The draws happen in a fixed order, so a seed always gives the same camera.
    """
    matrices = np.asarray(model.xyz_to_camera, np.float64)
    weights = rng.uniform(1e-8, 1.0, size=(len(matrices), 1, 1))
    xyz_to_camera = (matrices * weights).sum(axis=0) / weights.sum()
    rgb_to_camera = xyz_to_camera @ SRGB_TO_XYZ
    rgb_to_camera /= rgb_to_camera.sum(axis=1, keepdims=True)  # keep gray gray
    rgb_gain = 1.0 / max(rng.normal(BRIGHTNESS_MEAN, BRIGHTNESS_STD), 0.4)
    red_gain, blue_gain = rng.uniform(*model.red_gain), rng.uniform(*model.blue_gain)
    tone_shape = rng.uniform(*model.tone_shape)
    gamma = rng.uniform(*model.gamma) if model.gamma is not None else None
    drawn_shot = _log_uniform(rng, model.shot)
    jitter = rng.standard_normal()
    shot = drawn_shot if shot is None else float(shot)
    tail_shape = rng.uniform(*model.tail_shape)
    banding = _log_uniform(rng, model.banding_ratio)
    adc_bits = int(model.adc_bits[rng.integers(len(model.adc_bits))])
    demosaic_method = str(model.demosaic[rng.integers(len(model.demosaic))])
    use_jpeg = rng.uniform() < model.jpeg_probability
    quality = int(rng.integers(model.jpeg_quality[0], model.jpeg_quality[1] + 1))
    return {
        "model": model.name,
        "rgb_to_camera": [[float(v) for v in row] for row in rgb_to_camera],
        "rgb_gain": float(rgb_gain), "red_gain": float(red_gain), "blue_gain": float(blue_gain),
        "tone": model.tone, "tone_shape": float(tone_shape), "gamma": None if gamma is None else float(gamma),
        "shot_noise": shot, "read_noise": read_for_shot(shot, model.read_law, jitter),
        "tails": model.tails, "tail_shape": float(tail_shape),
        "banding": model.banding, "banding_ratio": float(banding),
        "adc_bits": adc_bits, "demosaic": demosaic_method, "jpeg_quality": quality if use_jpeg else None,
    }


# ---------------------------------------------------------------- tone curves

_GRID = np.linspace(0.0, 1.0, 4097)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return 3.0 * x**2 - 2.0 * x**3


def _srgb_oetf(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0.0031308), 1 / 2.4) - 0.055)


def _srgb_eotf(y: np.ndarray) -> np.ndarray:
    return np.where(y <= 0.04045, y / 12.92, np.power((np.maximum(y, 0.04045) + 0.055) / 1.055, 2.4))


def _tone(x: np.ndarray, params: dict) -> np.ndarray:
    """The camera's tone curve on gamma-encoded values in [0, 1] (monotone, 0 -> 0, 1 -> 1)."""
    shape = params["tone_shape"]
    if params["tone"] == "smoothstep":
        return (1.0 - shape) * x + shape * _smoothstep(x)
    low, high = 1.0 / (1.0 + np.exp(shape / 2)), 1.0 / (1.0 + np.exp(-shape / 2))
    return (1.0 / (1.0 + np.exp(-shape * (x - 0.5))) - low) / (high - low)


def encode(linear: np.ndarray, params: dict) -> np.ndarray:
    """Linear RGB -> display values: the camera's gamma (or sRGB transfer) then its tone curve."""
    linear = np.clip(linear, 0.0, 1.0)
    gamma = params["gamma"]
    encoded = np.power(np.maximum(linear, 1e-8), 1.0 / gamma) if gamma is not None else _srgb_oetf(linear)
    return np.clip(_tone(encoded, params), 0.0, 1.0).astype(np.float32)


def decode(display: np.ndarray, params: dict) -> np.ndarray:
    """Inverse of :func:`encode` (the tone curve inverted through a lookup table on a uniform grid)."""
    table = np.interp(_GRID, _tone(_GRID, params), _GRID).astype(np.float32)
    position = np.clip(np.asarray(display, np.float32), 0.0, 1.0) * np.float32(len(_GRID) - 1)
    index = np.minimum(position.astype(np.int32), len(_GRID) - 2)
    encoded = table[index] + (position - index) * (table[index + 1] - table[index])
    gamma = params["gamma"]
    linear = np.power(encoded, gamma) if gamma is not None else _srgb_eotf(encoded)
    return linear.astype(np.float32)


# ---------------------------------------------------------------- colour and mosaic

def _rgb_to_camera(params: dict) -> np.ndarray:
    return np.asarray(params["rgb_to_camera"], np.float32)


def _white_balance(params: dict) -> np.ndarray:
    """Per-channel gains the camera applies going forward (R, G, B)."""
    return np.array([params["red_gain"], 1.0, params["blue_gain"]], np.float32) * np.float32(params["rgb_gain"])


def _safe_inverse_gains(camera: np.ndarray, params: dict) -> np.ndarray:
    # Dividing bright pixels by the gains would turn clipped whites gray; the paper
    # fades the gains to 1 above the inflection point so highlights stay saturated.
    inverse = 1.0 / _white_balance(params)
    gray = camera.mean(axis=-1, keepdims=True)
    mask = (np.maximum(gray - HIGHLIGHT_INFLECTION, 0.0) / (1.0 - HIGHLIGHT_INFLECTION)) ** 2
    return camera * np.maximum(mask + (1.0 - mask) * inverse, inverse)


def bayer_masks(height: int, width: int) -> np.ndarray:
    """H x W x 3 indicator of which colour each RGGB site measures."""
    masks = np.zeros((height, width, 3), np.float32)
    masks[0::2, 0::2, 0] = 1
    masks[0::2, 1::2, 1] = 1
    masks[1::2, 0::2, 1] = 1
    masks[1::2, 1::2, 2] = 1
    return masks


def mosaic(camera_rgb: np.ndarray) -> np.ndarray:
    """RGGB Bayer plane (H x W) of an H x W x 3 image; H and W must be even."""
    height, width, _ = camera_rgb.shape
    if height % 2 or width % 2:
        raise ValueError(f"mosaic needs even height and width, got {height}x{width}")
    return (camera_rgb * bayer_masks(height, width)).sum(axis=-1).astype(camera_rgb.dtype)


def _filter(plane: np.ndarray, kernel) -> np.ndarray:
    # 'mirror' reflects about the edge sample, which keeps the Bayer phase at the borders.
    return correlate(plane, np.asarray(kernel, np.float32), mode="mirror")


def _bilinear(bayer: np.ndarray) -> np.ndarray:
    """Each missing sample is the mean of its nearest same-colour neighbours (Brooks et al.)."""
    masks = bayer_masks(*bayer.shape)
    red_blue = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
    green = [[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]]
    planes = [_filter(bayer * masks[..., c], kernel) for c, kernel in enumerate((red_blue, green, red_blue))]
    return np.stack(planes, axis=-1)


# Malvar, He and Cutler, "High-quality linear interpolation for demosaicing of Bayer-patterned
# color images" (ICASSP 2004): bilinear plus a Laplacian correction from the measured channel.
_MHC_G_AT_RB = np.array([[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1],
                         [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]]) / 8
_MHC_ROW = np.array([[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1],
                     [0, -1, 0, -1, 0], [0, 0, 0.5, 0, 0]]) / 8  # a colour whose samples sit left/right
_MHC_COLUMN = _MHC_ROW.T
_MHC_DIAGONAL = np.array([[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5],
                          [0, 2, 0, 2, 0], [0, 0, -1.5, 0, 0]]) / 8


def _malvar(bayer: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(bayer.shape)
    red, blue = (rows % 2 == 0) & (cols % 2 == 0), (rows % 2 == 1) & (cols % 2 == 1)
    green_red_row, green_blue_row = (rows % 2 == 0) & (cols % 2 == 1), (rows % 2 == 1) & (cols % 2 == 0)
    g_at_rb, row, column, diagonal = (_filter(bayer, k) for k in (_MHC_G_AT_RB, _MHC_ROW, _MHC_COLUMN,
                                                                     _MHC_DIAGONAL))
    r = np.select([red, green_red_row, green_blue_row, blue], [bayer, row, column, diagonal])
    g = np.where(red | blue, g_at_rb, bayer)
    b = np.select([blue, green_blue_row, green_red_row, red], [bayer, row, column, diagonal])
    return np.stack([r, g, b], axis=-1)


def _edge_directed(bayer: np.ndarray) -> np.ndarray:
    """Green along the smoother direction with a Laplacian correction (Hamilton-Adams style),
    then red and blue as bilinear colour differences to green."""
    p = np.pad(bayer, 2, mode="reflect")
    h, w = bayer.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]

    centre = at(0, 0)
    laplace_h, laplace_v = 2 * centre - at(0, -2) - at(0, 2), 2 * centre - at(-2, 0) - at(2, 0)
    green_h = (at(0, -1) + at(0, 1)) / 2 + laplace_h / 4
    green_v = (at(-1, 0) + at(1, 0)) / 2 + laplace_v / 4
    grad_h = np.abs(at(0, -1) - at(0, 1)) + np.abs(laplace_h)
    grad_v = np.abs(at(-1, 0) - at(1, 0)) + np.abs(laplace_v)
    estimate = np.where(grad_h < grad_v, green_h, np.where(grad_v < grad_h, green_v, (green_h + green_v) / 2))
    masks = bayer_masks(h, w)
    green = np.where(masks[..., 1] > 0, bayer, estimate)
    red_blue = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
    out = [None, green, None]
    for c in (0, 2):
        out[c] = green + _filter((bayer - green) * masks[..., c], red_blue)
    return np.stack(out, axis=-1)


DEMOSAIC_METHODS = {"bilinear": _bilinear, "malvar": _malvar, "edge": _edge_directed}


def demosaic(bayer: np.ndarray, method: str = "bilinear") -> np.ndarray:
    """An RGGB plane (H x W) to H x W x 3 with one of :data:`DEMOSAIC_METHODS`."""
    if method not in DEMOSAIC_METHODS:
        raise ValueError(f"unknown demosaic method {method!r}; expected one of {', '.join(DEMOSAIC_METHODS)}")
    return DEMOSAIC_METHODS[method](np.asarray(bayer, np.float32)).astype(np.float32)


# ---------------------------------------------------------------- the camera, both ways

def unprocess(rgb: np.ndarray, params: dict) -> np.ndarray:
    """sRGB float H x W x 3 in [0, 1] (H, W even) to the linear raw RGGB plane (H x W)."""
    camera = decode(rgb, params) @ _rgb_to_camera(params).T
    return mosaic(np.clip(_safe_inverse_gains(camera, params), 0.0, 1.0).astype(np.float32))


def process(raw: np.ndarray, params: dict) -> np.ndarray:
    """Linear raw Bayer plane back to sRGB in [0, 1]: gains, demosaic, colour matrix, tone."""
    balanced = np.clip(raw * (bayer_masks(*raw.shape) @ _white_balance(params)), 0.0, 1.0)
    camera = demosaic(balanced, params["demosaic"])
    camera_to_rgb = np.linalg.inv(np.asarray(params["rgb_to_camera"], np.float64)).astype(np.float32)
    return encode(camera @ camera_to_rgb.T, params)


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...], tails: str, tail_shape: float) -> np.ndarray:
    """Unit-variance, zero-mean noise: Tukey-lambda (ELD) or Student-t."""
    if tails == "student":
        dof = tail_shape
        return (rng.standard_t(dof, size=shape) * np.sqrt((dof - 2) / dof)).astype(np.float32)
    lam = tail_shape
    u = rng.uniform(1e-12, 1 - 1e-12, size=shape)
    if abs(lam) < 1e-6:
        return (np.log(u / (1 - u)) / (np.pi / np.sqrt(3))).astype(np.float32)
    samples = (u**lam - (1 - u) ** lam) / lam
    from math import gamma as gamma_fn

    variance = 2.0 / lam**2 * (1.0 / (1 + 2 * lam) - gamma_fn(lam + 1) ** 2 / gamma_fn(2 * lam + 2))
    return (samples / np.sqrt(variance)).astype(np.float32)


def add_raw_noise(raw: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise on a raw plane: Poisson shot (variance ``shot * x``), heavy-tailed read
    (variance ``read``), banding along rows or columns, then ADC quantization. Not clipped."""
    raw = np.asarray(raw, np.float32)
    shot, read = params["shot_noise"], params["read_noise"]
    noisy = rng.poisson(np.maximum(raw, 0.0) / shot).astype(np.float32) * np.float32(shot)
    read_std = np.float32(np.sqrt(read))
    noisy += read_std * heavy_tailed(rng, raw.shape, params["tails"], params["tail_shape"])
    band_std = read_std * np.float32(params["banding_ratio"])
    if params["banding"] == "rows":
        noisy += band_std * rng.standard_normal((raw.shape[0], 1), dtype=np.float32)
    else:
        noisy += band_std * rng.standard_normal((1, raw.shape[1]), dtype=np.float32)
    levels = np.float32(2 ** params["adc_bits"] - 1)
    return np.round(noisy * levels) / levels


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_8bit(image)).save(buffer, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), np.float32) / 255.0


def to_8bit(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------- scene colours

# Not a camera property: the scene's own colours, widened before the camera sees them, because a
# few training photos hold few hues and a model ties its denoising to them (docs/evaluation.md,
# "Colour"). Saturation around the luma axis, and a tint of per-channel gains (log-uniform, scaled
# so a gray keeps its luma) that turns a neutral or brown scene blue or green. Channel order is
# never changed.
SCENE_SATURATION = (0.6, 1.6)
SCENE_TINT = 0.5  # log-gain bound per channel
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def recolor_scene(rgb: np.ndarray, rng: np.random.Generator, *, saturation: tuple[float, float] = SCENE_SATURATION,
                  tint: float = SCENE_TINT) -> np.ndarray:
    """The same scene in other colours (sRGB float in [0, 1]); gray pixels keep their luma."""
    rgb = np.asarray(rgb, np.float32)
    luma = (rgb @ LUMA)[..., None]
    gains = np.exp(rng.uniform(-tint, tint, 3)).astype(np.float32)
    gains /= gains @ LUMA
    out = gains * (luma + np.float32(rng.uniform(*saturation)) * (rgb - luma))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def synthesize_pair(rgb: np.ndarray, rng: np.random.Generator, params: dict | None = None, *,
                    model: CameraModel = TRAIN_CAMERA) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(clean target, noisy, camera params)`` that differ by the camera's noise only.

    The target is the same image sent through the same camera with zero noise (no sensor
    noise, no ADC rounding, no JPEG), so the softening of the demosaic is on both sides and a
    model trained on the pair learns denoising, not sharpening (as Brooks et al. train on
    noiseless raw targets). Both come out as float32 in [0, 1] on the 8-bit grid of an sRGB
    file. Odd sizes are mirror-padded to even for the Bayer pattern and cropped back.
    """
    rgb = np.asarray(rgb, np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 image, got shape {rgb.shape}")
    if params is None:
        params = sample_camera(rng, model)
    height, width, _ = rgb.shape
    padded = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="reflect")
    raw = unprocess(padded, params)
    target, noisy = process(raw, params), process(add_raw_noise(raw, params, rng), params)
    if params["jpeg_quality"] is not None:
        noisy = _jpeg(noisy, params["jpeg_quality"])
    crop = (slice(0, height), slice(0, width))
    quantize = np.float32(255.0)
    return (np.round(target[crop] * quantize) / quantize, np.round(noisy[crop] * quantize) / quantize, params)


def synthesize(rgb: np.ndarray, rng: np.random.Generator, *, model: CameraModel = TRAIN_CAMERA,
               params: dict | None = None) -> tuple[np.ndarray, dict]:
    """A noisy version of a clean sRGB float image, and the camera that made it."""
    _, noisy, params = synthesize_pair(rgb, rng, params, model=model)
    return noisy, params


def synthesize_test_pair(rgb: np.ndarray, rng: np.random.Generator,
                         params: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`synthesize_pair` with the held-out :data:`TEST_CAMERA`."""
    return synthesize_pair(rgb, rng, params, model=TEST_CAMERA)
