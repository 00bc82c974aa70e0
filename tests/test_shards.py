"""Shards and readers on the real stack; alignment is checked with noisy = 1 - clean."""

import numpy as np
import pytest

from pipeline.images import encode_png
from pipeline.shards import (DatasetError, aligned_crops, read_card, split_files, training_patches,
                             validation_pairs, write_json, write_split)


def _rows(n, size=48, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        clean = rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)
        rows.append({"key": f"k{i:02d}", "split": "train", "clean": encode_png(clean),
                     "noisy": encode_png(255 - clean), "height": size, "width": size + 8 * i,
                     "source": "test", "layout": "mirrored", "meta": "{}", "pair_hash": str(i)})
    return rows


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
