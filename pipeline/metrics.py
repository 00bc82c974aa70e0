"""Image quality metrics with the conventions used to report denoising results.

Images are numpy arrays H x W x 3 (float, in [0, 1]); ``batch_psnr`` is the
torch variant for validation loops. PSNR and SSIM follow scikit-image so
numbers are comparable with published Python evaluations.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.restoration import estimate_sigma

__all__ = ["batch_psnr", "estimate_noise_sigma", "psnr", "sidd_protocol", "ssim"]


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two H x W x C images of one shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB with data range 1.0 (inf for identical images)."""
    ref, test = _as_pair(ref, test)
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(ref, test, data_range=1.0))


def ssim(ref: np.ndarray, test: np.ndarray) -> float:
    """Channel-mean SSIM: 2-D SSIM per colour channel (Gaussian window, sigma 1.5), averaged.

    These are the settings of Wang et al. (2004) as exposed by scikit-image.
    MATLAB's ``ssim`` on an RGB array computes a volumetric 3-D SSIM instead,
    so values can differ slightly from MATLAB-evaluated papers.
    """
    ref, test = _as_pair(ref, test)
    return float(
        structural_similarity(
            ref,
            test,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def batch_psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR of (B, ...) tensors, shape (B,), float64.

    Computed in float64 because float32 mean squared errors of good
    reconstructions lose enough digits to move PSNR by hundredths of a dB.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")
    diff = pred.detach().double() - target.detach().double()
    mse = diff.flatten(1).pow(2).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def sidd_protocol(clean: np.ndarray, test: np.ndarray, block: int = 256) -> dict[str, float]:
    """SIDD-style evaluation: PSNR and SSIM averaged over non-overlapping block x block crops.

    Blocks are taken from the top-left; a remainder narrower than a block is
    ignored, and an image smaller than one block is evaluated whole. The
    ``ssim`` value is the channel-mean SSIM of :func:`ssim` (not MATLAB's
    3-D SSIM), also reported under the explicit key ``ssim_channel_mean``.
    """
    clean, test = _as_pair(clean, test)
    h, w = clean.shape[:2]
    ny, nx = max(h // block, 1), max(w // block, 1)
    bh, bw = min(block, h), min(block, w)
    scores = [
        (psnr(clean[y : y + bh, x : x + bw], test[y : y + bh, x : x + bw]),
         ssim(clean[y : y + bh, x : x + bw], test[y : y + bh, x : x + bw]))
        for y in range(0, ny * bh, bh)
        for x in range(0, nx * bw, bw)
    ]
    mean_psnr, mean_ssim = (float(np.mean(v)) for v in zip(*scores))
    return {"psnr": mean_psnr, "ssim": mean_ssim, "ssim_channel_mean": mean_ssim, "blocks": len(scores)}


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Noise standard deviation of an image without a reference (wavelet MAD, channel-averaged).

    Needs PyWavelets, which scikit-image uses for the wavelet transform.
    """
    image = np.asarray(image, dtype=np.float64)
    return float(estimate_sigma(image, channel_axis=-1, average_sigmas=True))
