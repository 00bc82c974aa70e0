"""Classic denoisers the model is measured against.

Each gets the noisy image (H x W x 3 float in [0, 1]) and estimates its own noise level,
because a real photo comes without one. Parameters follow scikit-image's examples.
The ``*_oracle`` variants are given the true noise level instead (the standard deviation
of noisy - clean over the image, see :func:`true_sigma`): the strongest setting a classic
method can have, and one no real photo offers.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Iterable

import numpy as np

from pipeline.metrics import estimate_noise_sigma

# weight = TV_WEIGHT_PER_SIGMA * sigma: the best constant for white Gaussian noise on the
# bundled photos (0.5..3 tried); camera noise, whose sigma the estimator underrates, likes more.
TV_WEIGHT_PER_SIGMA = 1.0


def _noisy(noisy: np.ndarray) -> np.ndarray:
    return noisy


def true_sigma(clean: np.ndarray, noisy: np.ndarray) -> float:
    """The image's real noise level: one standard deviation of noisy - clean over all pixels and channels."""
    return float(np.std(np.asarray(noisy, np.float64) - np.asarray(clean, np.float64)))


def _nl_means(noisy: np.ndarray, sigma: float | None = None) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    sigma = estimate_noise_sigma(noisy) if sigma is None else sigma
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6,
                            channel_axis=-1)


def _wavelet(noisy: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    # sigma=None: scikit-image estimates it per YCbCr channel with the same MAD estimator,
    # which beats one RGB sigma on both Gaussian and camera noise.
    return denoise_wavelet(noisy, channel_axis=-1, convert2ycbcr=True, method="BayesShrink", mode="soft",
                           rescale_sigma=True)


def _tv(noisy: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=TV_WEIGHT_PER_SIGMA * estimate_noise_sigma(noisy), channel_axis=-1)


def _wavelet_oracle(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    # One known RGB sigma holds for the RGB channels, not for YCbCr ones, so no conversion here.
    return denoise_wavelet(noisy, sigma=sigma, channel_axis=-1, convert2ycbcr=False, method="BayesShrink",
                           mode="soft", rescale_sigma=True)


def _bm3d(noisy: np.ndarray, sigma: float | None = None) -> np.ndarray:
    import bm3d  # optional extra: free for non-commercial use only

    sigma = estimate_noise_sigma(noisy) if sigma is None else sigma
    return bm3d.bm3d_rgb(noisy, sigma_psd=sigma, profile="np", colorspace="opp")


CLASSIC_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "noisy": _noisy, "nl_means": _nl_means, "wavelet": _wavelet, "tv": _tv, "bm3d": _bm3d,
}
#: Given the noisy image and its true sigma (:func:`true_sigma`).
ORACLE_METHODS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "nl_means_oracle": _nl_means, "wavelet_oracle": _wavelet_oracle, "bm3d_oracle": _bm3d,
}
OPTIONAL_PACKAGES = {"bm3d": "bm3d", "bm3d_oracle": "bm3d"}  # method -> module it needs


def available_methods(methods: Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
    """The methods that can run here, and a note for each optional one that cannot."""
    kept, notes = [], []
    for method in methods:
        module = OPTIONAL_PACKAGES.get(method)
        if module and importlib.util.find_spec(module) is None:
            notes.append(f"{method} skipped: the optional package `{module}` is not installed "
                         f"(`pip install -e '.[{module}]'`; free for non-commercial use only)")
        else:
            kept.append(method)
    return tuple(kept), notes
