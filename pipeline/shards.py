"""Paired datasets in object storage: Parquet shards (one row per pair), a dataset card, readers.

Layout of a dataset at ``DEST``::

    DEST/train/part-00000.parquet ...   rows: key, split, clean, noisy (PNG bytes), height, width,
    DEST/val/part-00000.parquet ...           source, layout, meta (JSON), pair_hash
    DEST/dataset.json                   the card: counts, sizes, source, seed, hashes, code version
    DEST/quarantine.json                what was rejected, with the reason

Both images live in the same row, so a pair can never be split apart by a shuffle or a
repartition. Decoding and cropping run in ``map_batches`` on Ray Data's CPUs.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.images import decode_png_float
from pipeline.settings import Settings
from pipeline.storage import arrow_fs_for, fsspec_for, join, write_atomic

SPLITS = ("train", "val")
CARD = "dataset.json"
QUARANTINE = "quarantine.json"
SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()),
    ("clean", pa.binary()), ("noisy", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("source", pa.string()), ("layout", pa.string()), ("meta", pa.string()), ("pair_hash", pa.string()),
])


class DatasetError(PipelineError):
    """A dataset URI that does not hold a usable paired dataset."""


# ---------------------------------------------------------------- writing

def write_split(rows: list[dict], dataset_uri: str, split: str, settings: Settings, *,
                rows_per_shard: int = 64) -> list[str]:
    """Write one split as ``part-NNNNN.parquet`` shards, sorted by key so reruns give equal files."""
    rows = sorted(rows, key=lambda r: r["key"])
    return [write_shard(rows[start:start + rows_per_shard], dataset_uri, split, n, settings)[0]
            for n, start in enumerate(range(0, len(rows), rows_per_shard))]


def write_shard(rows: list[dict], dataset_uri: str, split: str, index: int, settings: Settings) -> tuple[str, int]:
    """Write ``split/part-<index>.parquet`` atomically (rows in key order); returns its path and size in bytes."""
    fs, root = fsspec_for(dataset_uri, settings)
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.Table.from_pylist([{name: r.get(name) for name in SCHEMA.names} for r in rows], schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")  # PNG bytes don't compress further
    path = join(root, split, shard_name(index))
    write_atomic(fs, path, buffer.getvalue())
    return path, buffer.tell()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_json(dataset_uri: str, name: str, data, settings: Settings) -> None:
    fs, root = fsspec_for(dataset_uri, settings)
    write_atomic(fs, join(root, name), json.dumps(data, indent=2, sort_keys=True, default=str).encode())


# ---------------------------------------------------------------- reading

def read_card(dataset_uri: str, settings: Settings) -> dict:
    fs, root = fsspec_for(dataset_uri, settings)
    path = join(root, CARD)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DatasetError(f"no {CARD} at {dataset_uri}: not a dataset written by jobs/ingest.py "
                           f"(ingest one first, or check the URI)") from None


def split_files(dataset_uri: str, split: str, settings: Settings) -> list[str]:
    """Shard paths of one split; a clear error when there are none."""
    fs, root = fsspec_for(dataset_uri, settings)
    try:
        # Hidden names are write_atomic's temporaries (or a crashed write's leftovers), never shards.
        files = sorted(p for p in fs.find(join(root, split))
                       if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))
    except FileNotFoundError:
        files = []
    if not files:
        raise DatasetError(f"dataset {dataset_uri} has no '{split}' shards (expected {split}/part-*.parquet)")
    return files


def _to_chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def _pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image that is smaller than the patch (ingest normally rejects those)."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    return np.pad(image, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")


def aligned_crops(clean: np.ndarray, noisy: np.ndarray, *, patch_size: int, crops: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``crops`` random patches cut at the same offsets from both images, then the same
    random flip / 90-degree rotation applied to both: (crops, 3, P, P) float32 each."""
    clean, noisy = _pad_to(clean, patch_size), _pad_to(noisy, patch_size)
    h, w = clean.shape[:2]
    out_clean, out_noisy = [], []
    for _ in range(crops):
        y, x = rng.integers(0, h - patch_size + 1), rng.integers(0, w - patch_size + 1)
        a = clean[y:y + patch_size, x:x + patch_size]
        b = noisy[y:y + patch_size, x:x + patch_size]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        a, b = np.rot90(a, k), np.rot90(b, k)
        if flip:
            a, b = a[:, ::-1], b[:, ::-1]
        out_clean.append(_to_chw(a))
        out_noisy.append(_to_chw(b))
    return np.stack(out_clean), np.stack(out_noisy)


def random_crops(batch: dict, *, patch_size: int, crops_per_image: int, seed: int | None) -> dict:
    """map_batches function: decode PNGs, cut aligned patches. ``seed=None`` gives new
    patches every epoch; a fixed seed repeats the same stream (for tests and benchmarks).

    A plain function, not a callable class: ``_shard_patches`` calls it inside the one reader
    task per shard, where a class would need an actor pool started (one actor first) every epoch.
    """
    keys = [str(k) for k in batch["key"]]
    digest = hashlib.blake2b("\0".join(keys).encode(), digest_size=8).digest()
    entropy = None if seed is None else [seed, int.from_bytes(digest, "big")]
    rng = np.random.default_rng(entropy)
    cleans, noisies = [], []
    for clean_png, noisy_png in zip(batch["clean"], batch["noisy"]):
        c, n = aligned_crops(decode_png_float(clean_png), decode_png_float(noisy_png),
                             patch_size=patch_size, crops=crops_per_image, rng=rng)
        cleans.append(c)
        noisies.append(n)
    return {"clean": np.concatenate(cleans), "noisy": np.concatenate(noisies)}


def _shard_patches(batch: dict, *, dataset_uri: str, settings: Settings, batch_size: int, **crop_args):
    """map_batches generator over shard paths: read each shard, yield patches ``batch_size`` pairs at a time."""
    fs, _ = arrow_fs_for(dataset_uri, settings)
    for path in batch["path"]:
        table = pq.read_table(path, filesystem=fs, columns=["key", "clean", "noisy"])
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            yield random_crops({name: chunk.column(name).to_pylist() for name in chunk.column_names}, **crop_args)


def training_patches(dataset_uri: str, settings: Settings, *, patch_size: int, crops_per_image: int = 8,
                     split: str = "train", seed: int | None = None, batch_size: int = 4,
                     num_cpus: float = 0.5):
    """Streaming Ray Dataset of aligned random patches {"clean", "noisy"}: float32 (3,P,P) in [0,1].

    One task per shard reads it with pyarrow and cuts its patches. Ray 2.60's
    ``read_parquet`` spent 15-25 s per epoch listing two known files on the local
    stack (benchmarks/bench_reader.py); the shard list is known, so it is not listed again.
    Each task asks for ``num_cpus`` (half a CPU by default) so that a small cluster whose
    CPUs are partly held by train workers can still schedule the reader.
    """
    import ray.data

    files = split_files(dataset_uri, split, settings)
    crop_args = {"patch_size": patch_size, "crops_per_image": crops_per_image, "seed": seed}
    return ray.data.from_items([{"path": path} for path in files], override_num_blocks=len(files)).map_batches(
        _shard_patches, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"dataset_uri": dataset_uri, "settings": settings, "batch_size": batch_size, **crop_args})


def center_crop(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return image
    h, w = image.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[top:top + size, left:left + size]


def validation_pairs(dataset_uri: str, settings: Settings, *, split: str = "val", crop: int | None = None,
                     limit: int | None = None) -> list[dict]:
    """Deterministic full images (or centre crops) without Ray: {"key", "clean", "noisy"} HxWx3 float32."""
    fs, _ = arrow_fs_for(dataset_uri, settings)
    pairs = []
    for path in split_files(dataset_uri, split, settings):
        table = pq.read_table(path, filesystem=fs, columns=["key", "clean", "noisy"])
        for row in table.to_pylist():
            pairs.append({"key": row["key"],
                          "clean": center_crop(decode_png_float(row["clean"]), crop),
                          "noisy": center_crop(decode_png_float(row["noisy"]), crop)})
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs
