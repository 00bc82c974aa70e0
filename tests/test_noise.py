"""The camera-noise models of pipeline.noise against their own definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.noise import (
    CAMERA_MODELS,
    DEMOSAIC_METHODS,
    LUMA,
    SCENE_TINT,
    TEST_CAMERA,
    TRAIN_CAMERA,
    add_raw_noise,
    camera_model,
    decode,
    demosaic,
    encode,
    heavy_tailed,
    mosaic,
    process,
    recolor_scene,
    sample_camera,
    synthesize,
    synthesize_pair,
    synthesize_test_pair,
    test_camera,
    unprocess,
)

seeds = st.integers(0, 2**32 - 1)
models = st.sampled_from([TRAIN_CAMERA, TEST_CAMERA])


def smooth_image(height: int = 32, width: int = 48) -> np.ndarray:
    """Mid-tone, low-saturation gradients: no clipping anywhere in the camera pipeline."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    return np.stack(
        [0.35 + 0.2 * np.sin(3 * x), 0.4 + 0.2 * np.cos(2 * y), 0.35 + 0.15 * np.sin(x + y)], axis=-1
    ).astype(np.float32)


def quiet(params: dict, **changes) -> dict:
    """The same camera without JPEG (and with any other value changed)."""
    return {**params, "jpeg_quality": None, **changes}


def within(value: float, bounds) -> bool:
    return bounds[0] <= value <= bounds[1]


@settings(max_examples=60, deadline=None)
@given(seed=seeds, model=models)
def test_sampled_cameras_respect_their_models_ranges(seed, model):
    params = sample_camera(np.random.default_rng(seed), model)
    assert params["model"] == model.name
    assert within(params["red_gain"], model.red_gain) and within(params["blue_gain"], model.blue_gain)
    assert within(params["tone_shape"], model.tone_shape) and params["tone"] == model.tone
    assert (params["gamma"] is None) == (model.gamma is None)
    if model.gamma is not None:
        assert within(params["gamma"], model.gamma)
    assert within(params["shot_noise"], model.shot)
    slope, intercept, spread = model.read_law
    z = (np.log(params["read_noise"]) - slope * np.log(params["shot_noise"]) - intercept) / spread
    assert abs(z) < 7  # log-linear in the shot noise, with Gaussian jitter
    assert params["tails"] == model.tails and within(params["tail_shape"], model.tail_shape)
    assert params["banding"] == model.banding and within(params["banding_ratio"], model.banding_ratio)
    assert params["adc_bits"] in model.adc_bits and params["demosaic"] in model.demosaic
    quality = params["jpeg_quality"]
    assert quality is None or within(quality, model.jpeg_quality)
    matrix = np.asarray(params["rgb_to_camera"])
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-9)  # gray stays gray
    assert abs(np.linalg.det(matrix)) > 1e-3


def test_the_test_camera_is_built_differently_from_the_training_one():
    train, test = TRAIN_CAMERA, test_camera()
    assert test is TEST_CAMERA and camera_model("test") is TEST_CAMERA and set(CAMERA_MODELS) == {"train", "test"}
    train_ccms = {tuple(map(tuple, m)) for m in train.xyz_to_camera}
    assert not train_ccms & {tuple(map(tuple, m)) for m in test.xyz_to_camera}
    assert not set(train.demosaic) & set(test.demosaic)
    assert (train.tone, train.tails, train.banding) != (test.tone, test.tails, test.banding)
    assert train.read_law != test.read_law and train.red_gain != test.red_gain
    with pytest.raises(ValueError, match="unknown camera model 'nope'"):
        camera_model("nope")


@settings(max_examples=25, deadline=None)
@given(seed=seeds, model=models, height=st.integers(5, 24), width=st.integers(5, 24))
def test_pairs_are_float32_in_unit_range_on_the_8bit_grid_for_any_size(seed, model, height, width):
    rgb = np.random.default_rng(seed).uniform(0, 1, (height, width, 3)).astype(np.float32)
    target, noisy, params = synthesize_pair(rgb, np.random.default_rng(seed), model=model)
    for image in (target, noisy):
        assert image.shape == rgb.shape and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        np.testing.assert_allclose(image * 255, np.round(image * 255), atol=1e-3)
    assert params["model"] == model.name


@settings(max_examples=20, deadline=None)
@given(seed=seeds, model=models)
def test_a_seed_reproduces_the_pair_and_another_seed_differs(seed, model):
    rgb = smooth_image()
    first = synthesize_pair(rgb, np.random.default_rng(seed), model=model)
    again = synthesize_pair(rgb, np.random.default_rng(seed), model=model)
    other = synthesize_pair(rgb, np.random.default_rng(seed + 1), model=model)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2] and first[2] != other[2]
    assert not np.array_equal(first[1], other[1])


def test_synthesize_and_synthesize_test_pair_are_the_pair_function_with_a_model():
    rgb = smooth_image()
    noisy, params = synthesize(rgb, np.random.default_rng(3))
    np.testing.assert_array_equal(noisy, synthesize_pair(rgb, np.random.default_rng(3))[1])
    test = synthesize_test_pair(rgb, np.random.default_rng(3))
    assert params["model"] == "train" and test[2]["model"] == "test"


@settings(max_examples=20, deadline=None)
@given(seed=seeds, model=models)
def test_noise_grows_with_the_shot_noise(seed, model):
    """Same camera, same random stream, four times the shot noise: more noise in sRGB."""
    rgb = np.full((48, 48, 3), 0.45, np.float32)
    params = quiet(sample_camera(np.random.default_rng(seed), model))
    levels = []
    for shot in (1e-3, 4e-3, 1.6e-2):
        target, noisy, _ = synthesize_pair(rgb, np.random.default_rng(seed), quiet(params, shot_noise=shot))
        levels.append(float(np.std(noisy - target)))
    assert levels[0] < levels[1] < levels[2]


@settings(max_examples=20, deadline=None)
@given(seed=seeds, model=models)
def test_noiseless_camera_round_trip_returns_the_photo(seed, model):
    rgb = smooth_image()
    params = sample_camera(np.random.default_rng(seed), model)
    back = process(unprocess(rgb, params), params)
    assert np.abs(back - rgb)[2:-2, 2:-2].max() < 0.02  # demosaic of a smooth image


@settings(max_examples=30, deadline=None)
@given(seed=seeds, model=models, value=st.floats(0.0, 1.0))
def test_decode_inverts_encode(seed, model, value):
    params = sample_camera(np.random.default_rng(seed), model)
    linear = np.array([value, value**2, value**3], np.float32)
    np.testing.assert_allclose(decode(encode(linear, params), params), linear, atol=2e-3)


@pytest.mark.parametrize("method", sorted(DEMOSAIC_METHODS))
def test_every_demosaic_keeps_measured_samples_and_reproduces_flat_and_ramp_images(method):
    y, x = np.mgrid[0:16, 0:20].astype(np.float32)
    flat = np.ones((16, 20, 3), np.float32) * np.array([0.2, 0.5, 0.7], np.float32)
    ramp = np.stack([0.01 * x + 0.02 * y + 0.1] * 3, axis=-1)
    for image in (flat, ramp):
        out = demosaic(mosaic(image), method)
        assert out.shape == image.shape and out.dtype == np.float32
        np.testing.assert_allclose(out[3:-3, 3:-3], image[3:-3, 3:-3], atol=1e-5)
    bayer = np.random.default_rng(0).uniform(0, 1, (8, 8)).astype(np.float32)
    np.testing.assert_allclose(mosaic(demosaic(bayer, method)), bayer, atol=1e-6)
    with pytest.raises(ValueError, match="unknown demosaic method"):
        demosaic(bayer, "nearest")


def test_mosaic_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        mosaic(np.zeros((5, 6, 3), np.float32))


@pytest.mark.parametrize(("tails", "shape"), [("tukey", -0.25), ("tukey", 0.0), ("tukey", 0.14), ("student", 4.0)])
def test_read_noise_tails_have_unit_variance_and_the_heavier_ones_more_kurtosis(tails, shape):
    samples = heavy_tailed(np.random.default_rng(0), (400_000,), tails, shape).astype(np.float64)
    assert abs(samples.mean()) < 0.01 and abs(samples.var() - 1) < 0.05
    kurtosis = np.mean(samples**4)
    assert kurtosis > 3.2 if (tails == "student" or shape < 0.1) else abs(kurtosis - 3) < 0.3


def test_raw_noise_has_the_models_variance_and_sits_on_the_adc_grid():
    params = {"shot_noise": 1e-3, "read_noise": 4e-5, "tails": "tukey", "tail_shape": 0.0,
              "banding": "rows", "banding_ratio": 0.02, "adc_bits": 12}
    raw = np.full((256, 256), 0.3, np.float32)
    noisy = add_raw_noise(raw, params, np.random.default_rng(0))
    expected = 1e-3 * 0.3 + 4e-5 * (1 + 0.02**2) + (1 / 4095) ** 2 / 12
    assert abs(noisy.var() / expected - 1) < 0.05
    np.testing.assert_allclose(noisy * 4095, np.round(noisy * 4095), atol=1e-2)


@pytest.mark.parametrize("banding", ["rows", "columns"])
def test_banding_runs_along_its_direction(banding):
    params = {"shot_noise": 1e-6, "read_noise": 1e-4, "tails": "student", "tail_shape": 5.0,
              "banding": banding, "banding_ratio": 1.0, "adc_bits": 14}
    raw = np.full((128, 128), 0.3, np.float32)
    noise = add_raw_noise(raw, params, np.random.default_rng(1)) - raw
    along_rows, along_columns = noise.mean(axis=1).var(), noise.mean(axis=0).var()
    assert (along_rows > 10 * along_columns) if banding == "rows" else (along_columns > 10 * along_rows)


def test_inputs_are_never_modified():
    rgb = smooth_image()
    copy = rgb.copy()
    synthesize_pair(rgb, np.random.default_rng(0))
    np.testing.assert_array_equal(rgb, copy)


def test_a_bad_image_shape_is_one_clear_error():
    with pytest.raises(ValueError, match="expected H x W x 3"):
        synthesize_pair(np.zeros((8, 8)), np.random.default_rng(0))


def test_model_ranges_are_plain_data_for_the_card():
    import json

    ranges = json.loads(json.dumps(TRAIN_CAMERA.ranges()))
    assert ranges["shot"] == list(TRAIN_CAMERA.shot) and ranges["demosaic"] == ["bilinear", "malvar"]
    params = json.loads(json.dumps(sample_camera(np.random.default_rng(0))))
    assert set(params) >= {"shot_noise", "read_noise", "demosaic", "jpeg_quality", "rgb_to_camera"}


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_recolored_scenes_are_in_range_repeat_with_the_seed_and_tint_a_gray_evenly(seed):
    rgb = smooth_image()
    out = recolor_scene(rgb, np.random.default_rng(seed))
    assert out.dtype == np.float32 and out.shape == rgb.shape and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out, recolor_scene(rgb, np.random.default_rng(seed)))
    # A gray scene (mid-tones: no clipping) gets one tint everywhere: the same per-channel gains at
    # every pixel, their log-ratios within the bound, and its luma unchanged.
    gray = np.repeat(rgb[:, :, 1:2] * 0.5, 3, axis=2)  # <= 0.3: no gain of the bound clips it
    tinted = recolor_scene(gray, np.random.default_rng(seed))
    ratio = (tinted / gray).reshape(-1, 3)
    assert np.ptp(ratio, axis=0).max() < 1e-5
    assert np.ptp(np.log(ratio[0])) <= 2 * SCENE_TINT + 1e-5
    np.testing.assert_allclose(tinted @ LUMA, gray @ LUMA, atol=1e-5)


def test_recoloring_without_change_is_the_identity_and_leaves_its_input_alone():
    rgb = smooth_image()
    copy = rgb.copy()
    same = recolor_scene(rgb, np.random.default_rng(0), saturation=(1.0, 1.0), tint=0.0)
    np.testing.assert_allclose(same, rgb, atol=1e-6)
    recolor_scene(rgb, np.random.default_rng(0))
    np.testing.assert_array_equal(rgb, copy)
