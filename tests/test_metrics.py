import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.metrics import batch_psnr, estimate_noise_sigma, psnr, sidd_protocol, ssim


def noisy_pair(seed: int, shape=(64, 80, 3), sigma=0.05):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    clean = np.stack([0.5 + 0.3 * np.sin(xx / (7 + c) + yy / 11) for c in range(shape[2])], axis=-1)
    noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 1)
    return clean, noisy


def test_psnr_and_ssim_follow_skimage_with_fixed_conventions():
    clean, noisy = noisy_pair(0)
    assert psnr(clean, noisy) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1.0))
    expected = structural_similarity(
        clean, noisy, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(clean, noisy) == pytest.approx(expected)
    assert ssim(clean, clean) == pytest.approx(1.0)
    assert math.isinf(psnr(clean, clean))
    with pytest.raises(ValueError):
        psnr(clean, noisy[:-1])


def test_psnr_known_value():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)


def test_batch_psnr_agrees_with_skimage_per_image():
    pairs = [noisy_pair(seed, sigma=s) for seed, s in enumerate((0.01, 0.05, 0.2))]
    clean = torch.from_numpy(np.stack([c for c, _ in pairs])).float().permute(0, 3, 1, 2)
    noisy = torch.from_numpy(np.stack([n for _, n in pairs])).float().permute(0, 3, 1, 2)
    got = batch_psnr(noisy, clean)
    assert got.shape == (3,) and got.dtype == torch.float64
    for i in range(3):
        ref = peak_signal_noise_ratio(
            clean[i].permute(1, 2, 0).double().numpy(), noisy[i].permute(1, 2, 0).double().numpy(), data_range=1.0
        )
        assert abs(got[i].item() - ref) < 1e-3


def test_sidd_protocol_averages_over_whole_blocks():
    clean, noisy = noisy_pair(1, shape=(70, 100, 3))
    result = sidd_protocol(clean, noisy, block=32)
    assert result["blocks"] == 2 * 3  # the 6-row and 4-column remainders are ignored
    blocks = [(y, x) for y in (0, 32) for x in (0, 32, 64)]
    assert result["psnr"] == pytest.approx(np.mean([psnr(clean[y : y + 32, x : x + 32], noisy[y : y + 32, x : x + 32]) for y, x in blocks]))
    assert result["ssim"] == pytest.approx(np.mean([ssim(clean[y : y + 32, x : x + 32], noisy[y : y + 32, x : x + 32]) for y, x in blocks]))
    assert result["ssim_channel_mean"] == result["ssim"]


def test_sidd_protocol_small_image_is_one_block():
    clean, noisy = noisy_pair(2, shape=(40, 50, 3))
    result = sidd_protocol(clean, noisy)
    assert result["blocks"] == 1
    assert result["psnr"] == pytest.approx(psnr(clean, noisy))


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_noise_sigma_estimate_tracks_the_true_sigma(sigma):
    pytest.importorskip("pywt", reason="skimage's estimate_sigma needs PyWavelets")
    rng = np.random.default_rng(3)
    clean, _ = noisy_pair(3, shape=(128, 128, 3))
    noisy = clean + rng.normal(0, sigma, clean.shape)
    assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.15)
