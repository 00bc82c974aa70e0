"""Shards and readers on the real stack; alignment is checked with noisy = 1 - clean."""

import itertools

import numpy as np
import pytest

from pipeline.images import encode_png
from pipeline.shards import (CHANNEL_SHUFFLES, DatasetError, aligned_crops, channel_orders, fresh_noise_crops,
                             mix_crops, random_crops, read_card, split_files, training_patches, validation_pairs,
                             write_json, write_split)


def _rows(n, size=48, seed=0, *, clean_only=False, prefix="k"):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        clean = rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)
        if clean_only:  # smooth, so a noiseless camera round trip gives the crop back closely
            y, x = np.mgrid[0:size, 0:size + 8 * i] / size
            clean = (np.stack([0.4 + 0.2 * np.sin(3 * x + i), 0.45 + 0.2 * np.cos(2 * y), 0.4 + 0.1 * x],
                              axis=-1) * 255).astype(np.uint8)
        rows.append({"key": f"{prefix}{i:02d}", "split": "train", "clean": encode_png(clean),
                     "noisy": None if clean_only else encode_png(255 - clean), "height": size,
                     "width": size + 8 * i, "source": "test", "layout": "clean" if clean_only else "mirrored",
                     "meta": "{}", "pair_hash": str(i)})
    return rows


def _smooth(height=40, width=52):
    y, x = np.mgrid[0:height, 0:width] / width
    return np.stack([0.4 + 0.2 * np.sin(3 * x), 0.45 + 0.2 * np.cos(2 * y), 0.4 + 0.1 * x], axis=-1).astype(np.float32)


def _fresh(noise_seed, crop_seed=3):
    return fresh_noise_crops(_smooth(), key="photo", patch_size=16, crops=4, rng=np.random.default_rng(crop_seed),
                             noise_seed=noise_seed)


def test_fresh_noise_is_new_on_every_read_of_the_same_crops():
    (target_a, noisy_a), (target_b, noisy_b) = _fresh(None), _fresh(None)
    assert target_a.shape == noisy_a.shape == (4, 3, 16, 16) and noisy_a.dtype == np.float32
    # the same crops (the crop stream is seeded) ...
    reference, _ = aligned_crops(_smooth(), _smooth(), patch_size=16, crops=4, rng=np.random.default_rng(3))
    for target in (target_a, target_b):
        assert np.abs(target - reference)[:, :, 2:-2, 2:-2].max() < 0.05
    # ... with different noise (and a different camera) each time
    assert not np.array_equal(noisy_a, noisy_b)
    assert np.abs(noisy_a - target_a).mean() > 1e-3


def test_a_noise_seed_gives_the_same_noise_for_the_same_crop():
    first, again, other = _fresh(11), _fresh(11), _fresh(12)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])
    # the noise belongs to the crop, not to its place in the stream: crop 0 again, alone
    alone = fresh_noise_crops(_smooth(), key="photo", patch_size=16, crops=1, rng=np.random.default_rng(3),
                              noise_seed=11)
    np.testing.assert_array_equal(alone[1][0], first[1][0])


def test_random_crops_handles_stored_pairs_and_clean_photos_in_one_batch():
    rows = _rows(1) + _rows(1, clean_only=True, prefix="c")
    batch = {name: [r[name] for r in rows] for name in ("key", "clean", "noisy")}
    out = random_crops(batch, patch_size=16, crops_per_image=3, seed=5, noise_seed=1)
    assert out["clean"].shape == out["noisy"].shape == (6, 3, 16, 16)
    np.testing.assert_allclose(out["noisy"][:3], 1 - out["clean"][:3], atol=1e-6)   # the stored pair, aligned
    assert 1e-3 < np.abs(out["noisy"][3:] - out["clean"][3:]).mean() < 0.2           # synthesized noise
    again = random_crops(batch, patch_size=16, crops_per_image=3, seed=5, noise_seed=1)
    np.testing.assert_array_equal(out["noisy"], again["noisy"])


def test_channel_shuffle_gives_both_sides_of_a_crop_one_random_channel_order():
    batch = {name: [r[name] for r in _rows(1)] for name in ("key", "clean", "noisy")}
    plain = random_crops(batch, patch_size=16, crops_per_image=24, seed=5)
    shuffled = random_crops(batch, patch_size=16, crops_per_image=24, seed=5, channel_shuffle="all")
    np.testing.assert_allclose(shuffled["noisy"], 1 - shuffled["clean"], atol=1e-6)  # one order for both sides
    orders = [next(order for order in itertools.permutations(range(3))
                   if np.array_equal(shuffled["clean"][i], plain["clean"][i][list(order)])) for i in range(24)]
    assert len(set(orders)) > 3                      # the same crops, in many orders, not one fixed swap
    again = random_crops(batch, patch_size=16, crops_per_image=24, seed=5, channel_shuffle="all")
    np.testing.assert_array_equal(shuffled["clean"], again["clean"])     # a seed fixes the orders too


def test_red_blue_shuffle_swaps_red_and_blue_and_never_moves_green():
    batch = {name: [r[name] for r in _rows(1)] for name in ("key", "clean", "noisy")}
    plain = random_crops(batch, patch_size=16, crops_per_image=40, seed=5)
    swapped = random_crops(batch, patch_size=16, crops_per_image=40, seed=5, channel_shuffle="red-blue")
    np.testing.assert_allclose(swapped["noisy"], 1 - swapped["clean"], atol=1e-6)
    np.testing.assert_array_equal(swapped["clean"][:, 1], plain["clean"][:, 1])
    flipped = [bool(np.array_equal(swapped["clean"][i], plain["clean"][i][::-1])) for i in range(40)]
    kept = [bool(np.array_equal(swapped["clean"][i], plain["clean"][i])) for i in range(40)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 <= sum(flipped) <= 30


@pytest.mark.parametrize("mode", CHANNEL_SHUFFLES)
def test_channel_orders_are_permutations(mode):
    orders = channel_orders(500, mode, np.random.default_rng(0))
    assert orders.shape == (500, 3)
    assert (np.sort(orders, axis=1) == np.arange(3)).all()
    assert len({tuple(o) for o in orders}) == {"none": 1, "red-blue": 2, "all": 6}[mode]
    assert channel_orders(0, mode, np.random.default_rng(0)).shape == (0, 3)


def test_mix_crops_splits_an_epoch_by_weight():
    assert mix_crops({"real": 10, "synthetic": 40}, {"real": 0.5, "synthetic": 0.5}, 8) == {"real": 4, "synthetic": 1}
    assert mix_crops({"real": 10, "synthetic": 5}, {"real": 0.25, "synthetic": 0.75}, 8) == {"real": 2, "synthetic": 12}
    assert mix_crops({"real": 10, "synthetic": 5}, {"real": 0.0, "synthetic": 1.0}, 8) == {"real": 0, "synthetic": 16}
    with pytest.raises(DatasetError, match="needs training pairs"):
        mix_crops({"real": 10, "synthetic": 0}, {"real": 0.5, "synthetic": 0.5}, 8)


def test_aligned_crops_pure():
    rng = np.random.default_rng(1)
    clean = rng.random((40, 50, 3), dtype=np.float32)
    c, n = aligned_crops(clean, 1 - clean, patch_size=16, crops=20, rng=rng)
    assert c.shape == n.shape == (20, 3, 16, 16) and c.dtype == np.float32
    np.testing.assert_allclose(n, 1 - c, atol=1e-6)
    # a patch larger than the image is reflect-padded, never an error
    c, n = aligned_crops(clean[:10], 1 - clean[:10], patch_size=16, crops=2, rng=rng)
    assert c.shape == (2, 3, 16, 16)


@pytest.mark.stack
def test_write_and_read_patches(settings, s3_prefix, ray_cluster):
    rows = _rows(5)
    paths = write_split(rows, s3_prefix, "train", settings, rows_per_shard=2)
    assert len(paths) == 3 and len(split_files(s3_prefix, "train", settings)) == 3
    write_split(rows[:2], s3_prefix, "val", settings)
    write_json(s3_prefix, "dataset.json", {"counts": {"train": 5, "val": 2}}, settings)
    assert read_card(s3_prefix, settings)["counts"]["train"] == 5

    patches = training_patches(s3_prefix, settings, patch_size=32, crops_per_image=3, seed=7)
    batches = list(patches.iter_batches(batch_size=None, batch_format="numpy"))
    clean = np.concatenate([b["clean"] for b in batches])
    noisy = np.concatenate([b["noisy"] for b in batches])
    assert clean.shape == (15, 3, 32, 32) and clean.dtype == np.float32
    assert 0.0 <= clean.min() and clean.max() <= 1.0
    np.testing.assert_allclose(noisy, 1 - clean, atol=1e-6)   # same offsets, flips, rotations

    val = validation_pairs(s3_prefix, settings, crop=32)
    assert [p["key"] for p in val] == ["k00", "k01"]
    assert val[0]["clean"].shape == (32, 32, 3)
    np.testing.assert_allclose(val[1]["noisy"], 1 - val[1]["clean"], atol=1e-6)


@pytest.mark.stack
def test_missing_dataset_is_a_clear_error(settings, s3_prefix):
    with pytest.raises(DatasetError, match="no dataset.json"):
        read_card(s3_prefix, settings)
    with pytest.raises(DatasetError, match="no 'train' shards"):
        split_files(s3_prefix, "train", settings)


@pytest.mark.stack
def test_clean_photos_get_fresh_noise_every_epoch_and_mix_with_real_pairs(settings, s3_prefix, ray_cluster):
    real, synthetic = f"{s3_prefix}/real", f"{s3_prefix}/synthetic"
    write_split(_rows(2), real, "train", settings)
    write_json(real, "dataset.json", {"counts": {"train": 2, "val": 0}}, settings)
    write_split(_rows(2, clean_only=True, prefix="c"), synthetic, "train", settings)
    write_json(synthetic, "dataset.json", {"counts": {"train": 2, "val": 0}}, settings)

    def epoch(uri, **kwargs):
        batches = training_patches(uri, settings, patch_size=16, crops_per_image=4, seed=7, **kwargs)
        parts = sorted((b for b in batches.iter_batches(batch_size=None, batch_format="numpy")),
                       key=lambda b: float(b["clean"].sum()))
        return np.concatenate([b["clean"] for b in parts]), np.concatenate([b["noisy"] for b in parts])

    first, second = epoch(synthetic), epoch(synthetic)
    assert first[1].shape == (8, 3, 16, 16)
    assert np.abs(first[0] - second[0]).max() < 0.05          # the same crops (seeded) ...
    assert not np.allclose(first[1], second[1], atol=1e-3)      # ... with new noise in each epoch
    fixed = [epoch(synthetic, noise_seed=3) for _ in range(2)]
    np.testing.assert_array_equal(fixed[0][1], fixed[1][1])     # a noise seed repeats it exactly

    clean, noisy = epoch(real, synthetic=synthetic, synthetic_weight=0.75)
    stored = np.isclose(noisy, 1 - clean, atol=1e-6).all(axis=(1, 2, 3))
    assert len(clean) == 8 and stored.sum() == 2                # 2 x 1 real crops, 2 x 3 synthetic ones
