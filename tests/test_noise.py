"""The camera-noise model of pipeline.noise against its own definition."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.noise import (
    BLUE_GAIN_RANGE,
    RED_GAIN_RANGE,
    SHOT_NOISE_RANGE,
    add_raw_noise,
    demosaic,
    mosaic,
    process,
    sample_camera_params,
    synthesize_camera_noise,
    unprocess,
)

seeds = st.integers(0, 2**32 - 1)


def smooth_image(height: int = 48, width: int = 64) -> np.ndarray:
    """Mid-tone, low-saturation gradients: no clipping anywhere in the camera pipeline."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    return np.stack(
        [0.35 + 0.2 * np.sin(3 * x), 0.4 + 0.2 * np.cos(2 * y), 0.35 + 0.15 * np.sin(x + y)], axis=-1
    ).astype(np.float32)


def noiseless(params):
    return dataclasses.replace(params, shot_noise=0.0, read_noise=0.0)


@settings(max_examples=50, deadline=None)
@given(seed=seeds)
def test_sampled_parameters_stay_in_the_papers_ranges(seed):
    params = sample_camera_params(np.random.default_rng(seed))
    assert RED_GAIN_RANGE[0] <= params.red_gain <= RED_GAIN_RANGE[1]
    assert BLUE_GAIN_RANGE[0] <= params.blue_gain <= BLUE_GAIN_RANGE[1]
    assert SHOT_NOISE_RANGE[0] <= params.shot_noise <= SHOT_NOISE_RANGE[1]
    assert params.read_noise > 0 and params.rgb_gain > 0
    # Rows sum to one, so a neutral gray stays neutral in camera space.
    np.testing.assert_allclose(params.rgb_to_camera_matrix.sum(axis=1), 1.0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_unprocess_then_process_without_mosaic_is_exact(seed):
    params = sample_camera_params(np.random.default_rng(seed))
    image = smooth_image()
    round_trip = process(unprocess(image, params, bayer=False), params)
    assert np.abs(round_trip - image).max() < 1e-4


@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_noiseless_round_trip_through_the_bayer_mosaic_is_close(seed):
    # Bilinear demosaicking is not lossless; on smooth content it is within 2e-3 on
    # average and 2e-2 at worst (the borders).
    params = noiseless(sample_camera_params(np.random.default_rng(seed)))
    image = smooth_image()
    noisy, used = synthesize_camera_noise(image, np.random.default_rng(seed), params)
    assert used == params
    assert np.abs(noisy - image).mean() < 2e-3
    assert np.abs(noisy - image).max() < 2e-2


def test_demosaic_keeps_measured_samples_and_restores_flat_colour():
    colour = np.array([0.2, 0.5, 0.7], np.float32)
    flat = np.broadcast_to(colour, (6, 8, 3)).copy()
    np.testing.assert_allclose(demosaic(mosaic(flat)), flat, atol=1e-6)
    bayer = np.random.default_rng(0).random((6, 8), dtype=np.float32)
    np.testing.assert_allclose(mosaic(demosaic(bayer)), bayer, atol=1e-6)


def test_mosaic_is_rggb_and_needs_even_sizes():
    image = np.zeros((2, 2, 3), np.float32)
    image[..., 0], image[..., 1], image[..., 2] = 1.0, 2.0, 3.0
    np.testing.assert_array_equal(mosaic(image), [[1.0, 2.0], [2.0, 3.0]])
    with pytest.raises(ValueError):
        mosaic(np.zeros((3, 4, 3), np.float32))


def test_raw_noise_variance_grows_linearly_with_brightness():
    shot, read = 0.01, 0.0005
    rng = np.random.default_rng(7)
    levels = np.linspace(0.05, 0.95, 10)
    variances = [add_raw_noise(np.full((400, 500), level), shot, read, rng).var() for level in levels]
    slope, intercept = np.polyfit(levels, variances, 1)
    assert slope == pytest.approx(shot, rel=0.03)
    assert intercept == pytest.approx(read, abs=3e-4)


def test_raw_noise_is_unbiased_and_zero_noise_is_identity():
    raw = np.full((300, 300), 0.3, np.float32)
    rng = np.random.default_rng(3)
    assert add_raw_noise(raw, 0.01, 1e-4, rng).mean() == pytest.approx(0.3, abs=1e-3)
    np.testing.assert_array_equal(add_raw_noise(raw, 0.0, 0.0, rng), raw)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, height=st.integers(1, 21), width=st.integers(1, 21))
def test_output_is_float32_in_range_with_the_input_shape(seed, height, width):
    image = np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)
    noisy, _ = synthesize_camera_noise(image, np.random.default_rng(seed))
    assert noisy.shape == image.shape and noisy.dtype == np.float32
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0


def test_same_seed_same_output_and_different_seed_differs():
    image = smooth_image(33, 47)
    first, first_params = synthesize_camera_noise(image, np.random.default_rng(11))
    again, again_params = synthesize_camera_noise(image, np.random.default_rng(11))
    other, _ = synthesize_camera_noise(image, np.random.default_rng(12))
    np.testing.assert_array_equal(first, again)
    assert first_params == again_params
    assert not np.array_equal(first, other)


def test_synthesized_noise_is_visible_and_brighter_areas_are_noisier():
    camera = sample_camera_params(np.random.default_rng(0))
    params = dataclasses.replace(camera, shot_noise=0.01, read_noise=1e-5)
    raw_noise_std = []
    for level in (0.1, 0.6):
        flat = np.full((64, 64, 3), level, np.float32)
        noisy, _ = synthesize_camera_noise(flat, np.random.default_rng(1), params)
        raw_noise_std.append((unprocess(noisy, params) - unprocess(flat, params)).std())
    assert 0 < raw_noise_std[0] < raw_noise_std[1]


def test_params_record_as_plain_values():
    record = sample_camera_params(np.random.default_rng(0)).as_dict()
    assert set(record) == {"rgb_to_camera", "rgb_gain", "red_gain", "blue_gain", "shot_noise", "read_noise"}
    assert all(isinstance(v, float) for k, v in record.items() if k != "rgb_to_camera")


def test_synthesized_pair_differs_by_noise_only():
    """Zero noise makes the two sides identical: the target went through the same camera."""
    from pipeline.noise import synthesize_pair

    rng = np.random.default_rng(3)
    rgb = rng.random((33, 41, 3), dtype=np.float32)
    params = sample_camera_params(np.random.default_rng(4))
    quiet = dataclasses.replace(params, shot_noise=0.0, read_noise=0.0)
    target, noisy, _ = synthesize_pair(rgb, rng, quiet)
    assert target.shape == noisy.shape == rgb.shape
    np.testing.assert_allclose(target, noisy, atol=1e-6)
    target, noisy, _ = synthesize_pair(rgb, np.random.default_rng(5), params)
    assert np.abs(noisy - target).mean() > 1e-3
