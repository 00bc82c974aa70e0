"""The ingest stage end to end on the real stack (SeaweedFS + Ray), plus its pure parts.

Every valid test pair has noisy = full scale - clean, so alignment can be checked on
any patch the reader cuts, whatever the bit depth or colour conversion.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from pipeline.demo_data import write_demo_tree
from pipeline.errors import PipelineError
from pipeline.images import decode_image, encode_png
from pipeline.ingest import IngestError, ingest, ingest_shard, make_config, plan_shards
from pipeline.pairs import Pair, split_for
from pipeline.settings import Settings
from pipeline.shards import DatasetError, SPLITS, read_card, split_files, training_patches, validation_pairs
from pipeline.storage import arrow_fs_for, fsspec_for, join

from tests.conftest import run_job

SIDD_FOLDERS = ("0001_001_S6_00100_00060_3200_L", "0002_001_GP_00800_00350_5500_N", "0003_002_IP_01600_01000_4400_H")


# ---------------------------------------------------------------- helpers

def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def random_rgb(h=64, w=64, seed=0, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, (h, w, 3)).astype(dtype)


def write_inverse_pair(clean_path: Path, noisy_path: Path, clean: np.ndarray) -> None:
    write(clean_path, encode_png(clean))
    write(noisy_path, encode_png(np.iinfo(clean.dtype).max - clean))


def pil_png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def stored_rows(dest: str, settings: Settings) -> dict[str, dict]:
    fs, _ = arrow_fs_for(dest, settings)
    rows = {}
    for split in SPLITS:
        try:
            files = split_files(dest, split, settings)
        except DatasetError:
            continue
        for file in files:
            rows |= {row["key"]: row for row in pq.read_table(file, filesystem=fs).to_pylist()}
    return rows


def read_json(uri: str, settings: Settings) -> dict:
    fs, path = fsspec_for(uri, settings)
    return json.loads(fs.cat_file(path))


def assert_inverse_patches(dest: str, settings: Settings, card: dict) -> None:
    """Patches cut by the training reader keep noisy = 1 - clean (same offsets, flips, rotations)."""
    for split in SPLITS:
        if not card["counts"][split]:
            continue
        patches = training_patches(dest, settings, patch_size=32, crops_per_image=2, split=split, seed=3)
        batches = list(patches.iter_batches(batch_size=None, batch_format="numpy"))
        clean = np.concatenate([b["clean"] for b in batches])
        noisy = np.concatenate([b["noisy"] for b in batches])
        assert clean.shape == (2 * card["counts"][split], 3, 32, 32)
        np.testing.assert_allclose(noisy, 1 - clean, atol=1e-6)


def run(settings: Settings, **values) -> dict:
    return ingest(make_config(task_cpus=0.5, **values), settings, log=lambda line: None)


# ---------------------------------------------------------------- pure parts (no stack)

def test_config_is_checked_once_with_readable_errors():
    with pytest.raises(IngestError, match="add --noise fresh"):
        make_config(source="a", dest="b", layout="clean")
    with pytest.raises(IngestError, match="layout 'clean' only"):
        make_config(source="a", dest="b", layout="mirrored", noise="camera")
    with pytest.raises(IngestError, match="'mirrored' only"):
        make_config(source="a", dest="b", layout="sidd", clean_template="{key}.png")
    with pytest.raises(IngestError, match="overlap"):
        make_config(source="s3://denoise/raw", dest="s3://denoise/raw/out", layout="sidd")
    with pytest.raises(IngestError, match="val_fraction"):
        make_config(source="a", dest="b", layout="sidd", val_fraction=1.5)
    demo = make_config(source="demo:", dest="s3://denoise/datasets/demo")
    assert (demo.layout, demo.noise, demo.variants, demo.dataset_name) == ("clean", "fresh", 1, "demo")
    assert make_config(source="demo:", dest="s3://denoise/d", noise="camera").variants == 2
    assert make_config(source="demo-test:", dest="s3://denoise/datasets/demo-test").noise == "test-camera"
    with pytest.raises(IngestError, match="never uses the test camera"):
        make_config(source="demo:", dest="b", noise="test-camera")
    with pytest.raises(IngestError, match="held-out camera"):
        make_config(source="demo-test:", dest="b", noise="fresh")


def test_shard_plan_depends_on_keys_not_listing_order():
    pairs = [Pair(f"scene{i:02d}", f"c/{i}.png", f"n/{i}.png") for i in range(30)]
    config = make_config(source="a", dest="b", layout="mirrored", pairs_per_shard=4, val_fraction=0.3)
    plans = plan_shards(pairs, config)
    assert plans == plan_shards(list(reversed(pairs)), config)
    assert all(len(p.pairs) <= 4 for p in plans)
    for plan in plans:
        assert all(split_for(p.key, 0.3, 0) == plan.split for p in plan.pairs)
        assert [p.key for p in plan.pairs] == sorted(p.key for p in plan.pairs)
    assert sorted(p.key for plan in plans for p in plan.pairs) == [p.key for p in pairs]
    assert {plan.split for plan in plans} == {"train", "val"}


def test_clean_photos_become_reproducible_variants_without_the_stack(tmp_path):
    """One shard task called directly (no Ray, local dest): 16-bit photos keep 16 bits."""
    write(tmp_path / "src" / "deep.png", encode_png(random_rgb(64, 80, seed=1, dtype=np.uint16)))
    write(tmp_path / "src" / "tiny.png", encode_png(random_rgb(20, 20)))
    config = make_config(source=str(tmp_path / "src"), dest=str(tmp_path / "out"), layout="clean",
                         noise="camera", variants=2)
    pairs = [Pair("deep", str(tmp_path / "src" / "deep.png"), None), Pair("tiny", str(tmp_path / "src/tiny.png"), None)]
    plan = plan_shards(pairs, config.model_copy(update={"val_fraction": 0.0}))[0]
    first = ingest_shard(plan, config, config.source, Settings())
    again = ingest_shard(plan, config, config.source, Settings())
    assert [r["key"] for r in first["rows"]] == ["deep_v0", "deep_v1"]
    assert first["rows"] == again["rows"]  # same seed, same noise, same PNG bytes
    assert first["rows"][0]["pair_hash"] != first["rows"][1]["pair_hash"]
    assert [(r["key"], r["reason"]) for r in first["rejected"]] == [("tiny", "clean: too small: 20x20 < patch size 64")]
    table = pq.read_table(first["path"]).to_pylist()
    noisy = decode_image(table[0]["noisy"])
    assert noisy.dtype == np.uint16 and noisy.shape == (64, 80, 3)
    meta = json.loads(table[0]["meta"])
    assert meta["variant"] == 0 and meta["bit_depth"] == 16 and meta["camera"]["shot_noise"] > 0


def test_fresh_noise_keeps_train_photos_clean_and_gives_val_photos_fixed_noise(tmp_path):
    write(tmp_path / "src" / "a.png", encode_png(random_rgb(64, 64, seed=2)))
    config = make_config(source=str(tmp_path / "src"), dest=str(tmp_path / "out"), layout="clean", noise="fresh",
                         variants=2)
    pair = Pair("a", str(tmp_path / "src" / "a.png"), None)
    train = ingest_shard(plan_shards([pair], config.model_copy(update={"val_fraction": 0.0}))[0], config,
                         config.source, Settings())
    stored = pq.read_table(train["path"]).to_pylist()
    assert [r["key"] for r in stored] == ["a"] and stored[0]["noisy"] is None
    assert json.loads(stored[0]["meta"])["noise"] == "fresh"
    val_plan = plan_shards([pair], config.model_copy(update={"val_fraction": 1.0}))[0]
    val = pq.read_table(ingest_shard(val_plan, config, config.source, Settings())["path"]).to_pylist()
    assert [r["key"] for r in val] == ["a_v0", "a_v1"] and all(r["noisy"] for r in val)
    assert json.loads(val[0]["meta"])["camera"]["model"] == "train"
    tested = make_config(source=str(tmp_path / "src"), dest=str(tmp_path / "t"), layout="clean", noise="test-camera")
    rows = ingest_shard(val_plan, tested, tested.source, Settings())
    assert json.loads(pq.read_table(rows["path"]).to_pylist()[0]["meta"])["camera"]["model"] == "test"


def test_recolor_gives_train_variants_after_the_first_new_scene_colours_and_leaves_val_alone(tmp_path):
    write(tmp_path / "src" / "a.png", encode_png(random_rgb(64, 64, seed=3)))
    pair = Pair("a", str(tmp_path / "src" / "a.png"), None)
    plain, recolored = (make_config(source=str(tmp_path / "src"), dest=str(tmp_path / name), layout="clean",
                                    noise="camera", variants=3, recolor=flag)
                        for name, flag in (("plain", False), ("rc", True)))

    def rows(config, val_fraction):
        plan = plan_shards([pair], config.model_copy(update={"val_fraction": val_fraction}))[0]
        return pq.read_table(ingest_shard(plan, config, config.source, Settings())["path"]).to_pylist()

    before, after = rows(plain, 0.0), rows(recolored, 0.0)
    assert [json.loads(r["meta"]).get("recolored", False) for r in after] == [False, True, True]
    assert after[0]["clean"] == before[0]["clean"] and after[0]["noisy"] == before[0]["noisy"]
    means = [decode_image(r["clean"]).reshape(-1, 3).mean(axis=0) for r in (before[1], after[1])]
    assert np.abs(means[0] - means[1]).max() > 2  # the scene's colours moved
    assert [r["clean"] for r in rows(recolored, 1.0)] == [r["clean"] for r in rows(plain, 1.0)]
    with pytest.raises(IngestError, match="--recolor needs --noise camera"):
        make_config(source=str(tmp_path / "src"), dest=str(tmp_path / "x"), layout="clean", noise="fresh",
                    recolor=True)


def test_demo_sources_split_the_photos_and_measure_their_blocks(tmp_path):
    from pipeline.demo_data import TEST_PHOTOS, TRAIN_PHOTOS, VAL_PHOTOS
    from pipeline.ingest import write_demo_source

    assert not (set(TRAIN_PHOTOS) & set(VAL_PHOTOS) or set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
                or set(VAL_PHOTOS) & set(TEST_PHOTOS))
    pairs, extra = write_demo_source(str(tmp_path / "demo"), test=False, seed=0)
    by_split = {split: [p for p in pairs if p.split == split] for split in ("train", "val")}
    assert [p.key for p in by_split["train"]] == list(TRAIN_PHOTOS)
    assert all(p.noisy_path is None for p in by_split["train"])
    assert {p.meta["photo"] for p in by_split["val"]} == set(VAL_PHOTOS)
    assert {p.meta["level"] for p in by_split["val"]} == {0, 1, 2}
    noisy_psnr = extra["demo"]["blocks"]["noisy_psnr"]
    assert noisy_psnr["blocks"] == len(by_split["val"]) >= 300
    assert noisy_psnr["stratified_standard_error"] < 0.1
    config = make_config(source="demo:", dest=str(tmp_path / "out"))
    plans = plan_shards(pairs, config)
    assert sum(p.split == "train" for p in plans) == len(TRAIN_PHOTOS)   # one photo per reader task
    assert all(len(p.pairs) <= 64 for p in plans)
    test_pairs, test_extra = write_demo_source(str(tmp_path / "test"), test=True, seed=0)
    assert {p.split for p in test_pairs} == {"test"} and {p.meta["photo"] for p in test_pairs} == set(TEST_PHOTOS)
    assert {p.meta["camera"]["model"] for p in test_pairs} == {"test"}
    assert test_extra["demo"]["blocks"]["camera"] == "test"


def test_demo_photo_sizes_store_each_training_photo_once_per_distinct_size(tmp_path):
    from pipeline.demo_data import PHOTO_SIZE, TRAIN_PHOTOS
    from pipeline.ingest import write_demo_source

    pairs, extra = write_demo_source(str(tmp_path / "demo"), test=False, seed=0, sizes=(PHOTO_SIZE, 512))
    train = {p.key: p for p in pairs if p.split == "train"}
    assert set(TRAIN_PHOTOS) <= train.keys() and extra["demo"]["train_photo_sizes"] == [PHOTO_SIZE, 512]
    for name in TRAIN_PHOTOS:
        small = Image.open(train[name].clean_path).size
        assert max(small) == PHOTO_SIZE
        if f"{name}_512" in train:  # a photo no larger than 384 px has one copy only
            assert max(Image.open(train[f"{name}_512"].clean_path).size) > PHOTO_SIZE
            assert train[f"{name}_512"].meta == {"photo": name, "size": 512}
    assert len(train) > len(TRAIN_PHOTOS)
    assert make_config(source="demo:", dest=str(tmp_path / "o"), photo_sizes="384, 512").photo_sizes == (384, 512)
    for bad in ({"source": "demo:", "photo_sizes": "32"}, {"source": "demo-test:", "photo_sizes": "512"}):
        with pytest.raises(IngestError, match="photo-sizes"):
            make_config(dest=str(tmp_path / "o"), **bad)


# ---------------------------------------------------------------- end to end on the stack

@pytest.fixture
def messy_tree(tmp_path) -> Path:
    """A mirrored tree with every kind of bad input next to valid (and convertible) pairs."""
    root = tmp_path / "messy"
    clean, noisy = root / "clean", root / "noisy"
    for i in range(4):
        write_inverse_pair(clean / f"good_{i}.png", noisy / f"good_{i}.png", random_rgb(64, 64 + 16 * i, seed=i))
    gray = random_rgb(64, 64, seed=10)[:, :, 0]
    write(clean / "gray.png", pil_png(gray, "L"))
    write(noisy / "gray.png", pil_png(255 - gray, "L"))
    rgba = np.random.default_rng(11).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    write(clean / "rgba.png", pil_png(rgba, "RGBA"))
    write(noisy / "rgba.png", pil_png(np.dstack([255 - rgba[:, :, :3], rgba[:, :, 3]]), "RGBA"))
    write_inverse_pair(clean / "deep.png", noisy / "deep.png", random_rgb(64, 64, seed=12, dtype=np.uint16))

    good_png = encode_png(random_rgb(seed=20))
    write(clean / "corrupt.png", good_png[:8] + b"\x00" * 40 + good_png[48:])
    write(noisy / "corrupt.png", good_png)
    write(clean / "truncated.png", good_png)
    write(noisy / "truncated.png", good_png[: len(good_png) // 2])
    write(clean / "empty.png", b"")
    write(noisy / "empty.png", good_png)
    write(clean / "fake.png", b"this is not a picture")
    write(noisy / "fake.png", good_png)
    write(clean / "notes.txt", b"shot handheld")
    write(clean / "lonely_clean.png", good_png)
    write(noisy / "lonely_noisy.png", good_png)
    write(clean / "mismatch.png", good_png)
    write(noisy / "mismatch.png", encode_png(random_rgb(72, 64)))
    write_inverse_pair(clean / "small.png", noisy / "small.png", random_rgb(40, 40))
    return root


EXPECTED_REJECTIONS = {
    "clean/corrupt.png": "clean: corrupt PNG header",
    "clean/empty.png": "clean: zero-byte file",
    "clean/fake.png": "clean: not an image (unrecognised format)",
    "clean/notes.txt": "not an image file (extension '.txt')",
    "clean/lonely_clean.png": "unpaired: no noisy counterpart",
    "noisy/lonely_noisy.png": "unpaired: no clean counterpart",
    "clean/mismatch.png": "size mismatch: clean 64x64 vs noisy 64x72",
    "clean/small.png": "too small: 40x40 < patch size 64",
    "clean/truncated.png": "noisy: truncated or corrupt PNG",
}


@pytest.mark.stack
def test_bad_inputs_are_quarantined_and_the_rest_lands_converted(messy_tree, settings, s3_prefix, ray_cluster):
    before = tree_digest(messy_tree)
    dest = f"{s3_prefix}/messy"
    card = run(settings, source=str(messy_tree), dest=dest, layout="mirrored", val_fraction=0.3)
    assert tree_digest(messy_tree) == before  # the source is only read

    valid = {"good_0", "good_1", "good_2", "good_3", "gray", "rgba", "deep"}
    assert set(card["pair_hashes"]) == valid
    assert card["counts"]["train"] + card["counts"]["val"] == 7 and card["counts"]["rejected"] == 9
    assert card["counts"]["val"] > 0 and card["counts"]["train"] > 0
    assert card["layout"] == "mirrored" and card["source"] == str(messy_tree) and card["name"] == "messy"
    assert card["code_version"]["version"] and card["created_at"]
    assert card["sizes"]["total"]["pixels"] == 64 * (64 + 80 + 96 + 112) + 3 * 64 * 64

    quarantine = read_json(join(dest, "quarantine.json"), settings)
    found = {str(Path(item["path"]).relative_to(messy_tree)): item["reason"] for item in quarantine["rejected"]}
    assert found.keys() == EXPECTED_REJECTIONS.keys() and quarantine["count"] == 9
    for path, reason in EXPECTED_REJECTIONS.items():
        assert found[path].startswith(reason), (path, found[path])

    rows = stored_rows(dest, settings)
    assert set(rows) == valid
    gray = decode_image(rows["gray"]["clean"])
    assert gray.shape == (64, 64, 3) and (gray[:, :, 0] == gray[:, :, 2]).all()
    rgba = decode_image(rows["rgba"]["noisy"])
    assert rgba.shape == (64, 64, 3) and rgba.dtype == np.uint8
    deep = decode_image(rows["deep"]["clean"])
    assert deep.dtype == np.uint16 and (deep == random_rgb(64, 64, seed=12, dtype=np.uint16)).all()
    assert json.loads(rows["deep"]["meta"])["bit_depth"] == 16
    assert {row["split"] for row in rows.values()} == {"train", "val"}
    assert_inverse_patches(dest, settings, card)

    # A rerun refuses to replace a finished dataset; --overwrite leaves no stale shard behind.
    with pytest.raises(IngestError, match="already holds a dataset"):
        run(settings, source=str(messy_tree), dest=dest, layout="mirrored", val_fraction=0.3)
    fs, root = fsspec_for(dest, settings)
    fs.pipe_file(join(root, "train", "part-00042.parquet"), b"stale")
    again = run(settings, source=str(messy_tree), dest=dest, layout="mirrored", val_fraction=0.3, overwrite=True)
    assert again["dataset_hash"] == card["dataset_hash"]
    listed = sorted(p.removeprefix(root + "/") for p in fsspec_for(dest, settings)[0].find(root))
    assert listed == sorted([*again["files"]["train"], *again["files"]["val"], "dataset.json", "quarantine.json"])


@pytest.mark.stack
def test_sidd_tree_from_s3(tmp_path, settings, s3_prefix, ray_cluster):
    data = tmp_path / "SIDD_Medium_Srgb" / "Data"
    for n, folder in enumerate(SIDD_FOLDERS):
        for capture in ("010", "011"):
            write_inverse_pair(data / folder / f"{folder[:4]}_GT_SRGB_{capture}.PNG",
                               data / folder / f"{folder[:4]}_NOISY_SRGB_{capture}.PNG",
                               random_rgb(64, 72, seed=10 * n + int(capture)))
    fs, source_root = fsspec_for(f"{s3_prefix}/source", settings)
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        fs.pipe_file(join(source_root, str(path.relative_to(tmp_path))), path.read_bytes())
    source = f"{s3_prefix}/source/SIDD_Medium_Srgb"
    listing = fs.find(source_root, detail=True)

    card = run(settings, source=source, dest=f"{s3_prefix}/sidd", layout="sidd", val_fraction=0.5, seed=1)
    assert card["counts"]["total"] == 6 and card["counts"]["rejected"] == 0
    assert {k: v["ETag"] for k, v in fsspec_for(source, settings)[0].find(source_root, detail=True).items()} == \
        {k: v["ETag"] for k, v in listing.items()}
    rows = stored_rows(f"{s3_prefix}/sidd", settings)
    first = rows[f"{SIDD_FOLDERS[0]}_010"]
    assert first["source"] == f"{source}/Data/{SIDD_FOLDERS[0]}/0001_GT_SRGB_010.PNG"
    meta = json.loads(first["meta"])
    assert meta["iso"] == 100 and meta["camera"] == "S6" and meta["noisy_source"].endswith("0001_NOISY_SRGB_010.PNG")
    for folder in SIDD_FOLDERS:  # both captures of a scene share a split
        assert rows[f"{folder}_010"]["split"] == rows[f"{folder}_011"]["split"] == split_for(folder, 0.5, 1)
    assert_inverse_patches(f"{s3_prefix}/sidd", settings, card)


@pytest.mark.stack
def test_templates_manifest_and_sidd_mat(tmp_path, settings, s3_prefix, ray_cluster):
    polyu = tmp_path / "polyu"  # both sides in one folder, named by templates
    for i, key in enumerate(("Canon5D2_chair", "Sony_desk")):
        write_inverse_pair(polyu / f"{key}_mean.PNG", polyu / f"{key}_real.PNG", random_rgb(seed=30 + i))
    card = run(settings, source=str(polyu), dest=f"{s3_prefix}/polyu", layout="mirrored", val_fraction=0.0,
               clean_template="{key}_mean.PNG", noisy_template="{key}_real.PNG")
    assert sorted(card["pair_hashes"]) == ["Canon5D2_chair", "Sony_desk"]
    assert card["templates"] == {"clean": "{key}_mean.PNG", "noisy": "{key}_real.PNG"}
    assert card["counts"]["val"] == 0 and card["files"]["val"] == []

    listed = tmp_path / "listed"
    for i in range(3):
        write_inverse_pair(listed / "img" / f"c{i}.png", listed / "img" / f"n{i}.png", random_rgb(seed=40 + i))
    write(listed / "manifest.csv", b"key,clean,noisy,split,iso\n" + b"".join(
        f"shot{i},img/c{i}.png,img/n{i}.png,{'val' if i == 2 else 'train'},{100 * (i + 1)}\n".encode()
        for i in range(3)) + b"gone,img/missing.png,img/n0.png,,\n")
    card = run(settings, source=str(listed), dest=f"{s3_prefix}/manifest", layout="manifest")
    rows = stored_rows(f"{s3_prefix}/manifest", settings)
    assert {k: r["split"] for k, r in rows.items()} == {"shot0": "train", "shot1": "train", "shot2": "val"}
    assert json.loads(rows["shot1"]["meta"])["iso"] == 200
    quarantine = read_json(f"{s3_prefix}/manifest/quarantine.json", settings)
    assert [(i["key"], i["reason"]) for i in quarantine["rejected"]] == [("gone", "clean: file not found")]

    blocks = np.random.default_rng(5).integers(0, 256, (2, 3, 64, 64, 3), dtype=np.uint8)
    (tmp_path / "mat").mkdir()
    scipy.io.savemat(tmp_path / "mat" / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": blocks})
    scipy.io.savemat(tmp_path / "mat" / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": 255 - blocks})
    card = run(settings, source=str(tmp_path / "mat"), dest=f"{s3_prefix}/mat", layout="sidd-mat",
               val_fraction=0.5, pairs_per_shard=2)
    assert card["counts"]["total"] == 6
    rows = stored_rows(f"{s3_prefix}/mat", settings)
    for image in range(2):  # blocks of one photo share a split
        assert len({rows[f"{image:02d}_{block:02d}"]["split"] for block in range(3)}) == 1
    np.testing.assert_array_equal(decode_image(rows["01_02"]["clean"]), blocks[1, 2])
    assert_inverse_patches(f"{s3_prefix}/mat", settings, card)


@pytest.mark.stack
def test_demo_photos_with_noise_variants_ingest_reproducibly(tmp_path, settings, s3_prefix, ray_cluster):
    names = ("astronaut", "coffee", "camera", "moon")
    write_demo_tree(tmp_path / "photos", "clean", size=96, names=names)
    first = run(settings, source=str(tmp_path / "photos"), dest=f"{s3_prefix}/a", layout="clean", noise="camera",
                variants=2, val_fraction=0.5, min_size=32)
    second = run(settings, source=str(tmp_path / "photos"), dest=f"{s3_prefix}/b", layout="clean", noise="camera",
                 variants=2, val_fraction=0.5, min_size=32)
    assert first["dataset_hash"] == second["dataset_hash"] and first["pair_hashes"] == second["pair_hashes"]
    assert first["created_at"] != second["created_at"]
    assert sorted(first["pair_hashes"]) == sorted(f"{n}_v{k}" for n in names for k in (0, 1))
    assert {k: first["noise"][k] for k in ("model", "variants")} == {"model": "camera", "variants": 2}
    assert first["noise"]["camera"]["name"] == "train" and first["counts"]["test"] == 0
    rows = stored_rows(f"{s3_prefix}/a", settings)
    for name in names:  # variants of one photo never straddle train/val
        assert rows[f"{name}_v0"]["split"] == rows[f"{name}_v1"]["split"] == split_for(name, 0.5, 0)
    assert rows["coffee_v0"]["noisy"] != rows["coffee_v1"]["noisy"]
    val = validation_pairs(f"{s3_prefix}/a", settings, split=rows["coffee_v0"]["split"], crop=32)
    noise = np.concatenate([(p["noisy"] - p["clean"]).ravel() for p in val])
    assert 0.002 < noise.std() < 0.3  # a real, moderate noise, not a copy and not garbage


@pytest.mark.stack
def test_job_cli_exit_codes_and_summary(tmp_path, settings, s3_prefix):
    source = tmp_path / "src"
    for i in range(2):
        write_inverse_pair(source / "clean" / f"p{i}.png", source / "noisy" / f"p{i}.png", random_rgb(seed=50 + i))
    write(source / "clean" / "broken.png", b"")
    write(source / "noisy" / "broken.png", encode_png(random_rgb()))
    dest = f"{s3_prefix}/cli"
    common = ["--layout", "mirrored", "--task-cpus", "0.5"]

    done = run_job("ingest.py", str(source), dest, *common, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ingested 2 pairs" in done.stdout and "rejected 1" in done.stdout and f"{dest}/dataset.json" in done.stdout
    assert "ingest: 3/3 pairs, 1 rejected" in done.stdout
    assert read_card(dest, settings)["counts"]["total"] == 2

    refused = run_job("ingest.py", str(source), dest, *common, timeout=120)
    assert refused.returncode == 2 and "already holds a dataset" in refused.stderr and "--overwrite" in refused.stderr

    strict = run_job("ingest.py", str(source), dest, *common, "--overwrite", "--strict", timeout=300)
    assert strict.returncode == 2 and "--strict" in strict.stderr, strict.stderr
    with pytest.raises(DatasetError):  # no half dataset left behind
        read_card(dest, settings)
    with pytest.raises(DatasetError):
        split_files(dest, "train", settings)
    assert read_json(f"{dest}/quarantine.json", settings)["count"] == 1

    (tmp_path / "empty").mkdir()
    empty = run_job("ingest.py", str(tmp_path / "empty"), f"{s3_prefix}/none", *common, timeout=120)
    assert empty.returncode == 2 and empty.stderr.startswith("error: no files under")
    assert "Traceback" not in empty.stderr

    helped = run_job("ingest.py", "--help", timeout=60)
    assert helped.returncode == 0 and "--variants" in helped.stdout and "demo:" in helped.stdout


@pytest.mark.stack
def test_no_valid_pair_is_an_error_and_writes_no_dataset(tmp_path, settings, s3_prefix, ray_cluster):
    write(tmp_path / "clean" / "a.png", b"")
    write(tmp_path / "noisy" / "a.png", b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(PipelineError, match="no valid pair"):
        run(settings, source=str(tmp_path), dest=f"{s3_prefix}/bad", layout="mirrored")
    quarantine = read_json(f"{s3_prefix}/bad/quarantine.json", settings)
    assert [i["reason"] for i in quarantine["rejected"]] == ["clean: zero-byte file"]
    with pytest.raises(DatasetError):
        read_card(f"{s3_prefix}/bad", settings)


def test_leaves_source_is_train_only_with_camera_noise_by_default(tmp_path):
    from pipeline.demo_data import LEAVES_IMAGES
    from pipeline.ingest import write_leaves_source

    config = make_config(source="leaves:", dest=str(tmp_path / "out"))
    assert (config.layout, config.noise, config.variants, config.pairs_per_shard) == ("clean", "camera", 4, 8)
    assert make_config(source="leaves:", dest=str(tmp_path / "o"), noise="fresh").noise == "fresh"
    with pytest.raises(IngestError, match="never uses the test camera"):
        make_config(source="leaves:", dest=str(tmp_path / "o"), noise="test-camera")
    pairs, extra = write_leaves_source(str(tmp_path / "leaves"))
    assert len(pairs) == LEAVES_IMAGES and {p.split for p in pairs} == {"train"}
    assert all(p.noisy_path is None for p in pairs)
    assert sum(p.meta["gray"] for p in pairs) == extra["leaves"]["gray"] == LEAVES_IMAGES // 2
    assert Image.open(pairs[0].clean_path).size == (extra["leaves"]["size"],) * 2
    assert len(plan_shards(pairs, config)) == -(-LEAVES_IMAGES // 8)
