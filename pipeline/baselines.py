"""Classic denoisers the model is measured against.

Each gets the noisy image (H x W x 3 float in [0, 1]) and estimates its own noise level,
because a real photo comes without one. Parameters follow scikit-image's examples.
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


def _nl_means(noisy: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    sigma = estimate_noise_sigma(noisy)
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


def _bm3d(noisy: np.ndarray) -> np.ndarray:
    import bm3d  # optional extra: free for non-commercial use only

    return bm3d.bm3d_rgb(noisy, sigma_psd=estimate_noise_sigma(noisy), profile="np", colorspace="opp")


CLASSIC_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "noisy": _noisy, "nl_means": _nl_means, "wavelet": _wavelet, "tv": _tv, "bm3d": _bm3d,
}
OPTIONAL_PACKAGES = {"bm3d": "bm3d"}  # method -> module it needs


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
