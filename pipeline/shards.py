"""Paired datasets in object storage: Parquet shards (one row per pair), a dataset card, readers.

Layout of a dataset at ``DEST``::

    DEST/train/part-00000.parquet ...   rows: key, split, clean, noisy (PNG bytes), height, width,
    DEST/val/part-00000.parquet ...           source, layout, meta (JSON), pair_hash; noisy is null
    DEST/test/part-00000.parquet ...          for a clean photo that the reader gives fresh noise
    DEST/dataset.json                   the card: counts, sizes, source, seed, hashes, code version
    DEST/quarantine.json                what was rejected, with the reason

Both images live in the same row, so a pair can never be split apart by a shuffle or a
repartition. Decoding and cropping run in ``map_batches`` on Ray Data's CPUs.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.images import decode_png_float
from pipeline.settings import Settings
from pipeline.storage import arrow_fs_for, fsspec_for, join, write_atomic

SPLITS = ("train", "val", "test")  # test: only in test sets, for judging
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


def _crop_window(h: int, w: int, patch_size: int, rng: np.random.Generator) -> tuple[int, int, int, bool]:
    """Offset, 90-degree turns and flip of one random patch."""
    y, x = int(rng.integers(0, h - patch_size + 1)), int(rng.integers(0, w - patch_size + 1))
    return y, x, int(rng.integers(4)), bool(rng.integers(2))


def _cut(image: np.ndarray, window: tuple[int, int, int, bool], patch_size: int) -> np.ndarray:
    y, x, k, flip = window
    patch = np.rot90(image[y:y + patch_size, x:x + patch_size], k)
    return patch[:, ::-1] if flip else patch


def aligned_crops(clean: np.ndarray, noisy: np.ndarray, *, patch_size: int, crops: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``crops`` random patches cut at the same offsets from both images, then the same
    random flip / 90-degree rotation applied to both: (crops, 3, P, P) float32 each."""
    clean, noisy = _pad_to(clean, patch_size), _pad_to(noisy, patch_size)
    windows = [_crop_window(*clean.shape[:2], patch_size, rng) for _ in range(crops)]
    return (np.stack([_to_chw(_cut(clean, w, patch_size)) for w in windows]),
            np.stack([_to_chw(_cut(noisy, w, patch_size)) for w in windows]))


def fresh_noise_crops(clean: np.ndarray, *, key: str, patch_size: int, crops: int, rng: np.random.Generator,
                      noise_seed: int | None, model: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``crops`` random patches of a clean photo, each given new camera noise after its flip or
    rotation (so the Bayer pattern stays in sensor orientation): (target, noisy), (crops, 3, P, P).

    ``noise_seed=None`` draws new noise every call; a fixed seed gives the same noise for the
    same crop (key, offset, rotation, flip), whatever batch or epoch it lands in.
    """
    from pipeline.noise import camera_model, synthesize_pair

    camera = camera_model(model)
    clean = _pad_to(clean, patch_size)
    key_seed = _key_digest(key)
    fresh = np.random.default_rng() if noise_seed is None else None  # not the crop stream: new noise always
    targets, noisies = [], []
    for _ in range(crops):
        window = _crop_window(*clean.shape[:2], patch_size, rng)
        noise_rng = fresh if fresh is not None else np.random.default_rng([noise_seed, key_seed, *window[:3], int(window[3])])
        target, noisy, _ = synthesize_pair(np.ascontiguousarray(_cut(clean, window, patch_size)), noise_rng,
                                           model=camera)
        targets.append(_to_chw(target))
        noisies.append(_to_chw(noisy))
    return np.stack(targets), np.stack(noisies)


def _key_digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


CHANNEL_SHUFFLES = ("none", "all", "red-blue")


def channel_orders(count: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """(count, 3) channel orders, one per crop: any permutation ('all'), R and B swapped with
    probability 1/2 ('red-blue': G, the least noisy channel in every Bayer camera, keeps its
    place), or the identity ('none')."""
    if mode == "all":
        return np.array([rng.permutation(3) for _ in range(count)], dtype=np.intp).reshape(count, 3)
    if mode == "red-blue":
        return np.where(rng.random(count)[:, None] < 0.5, [2, 1, 0], [0, 1, 2])
    if mode == "none":
        return np.tile(np.arange(3), (count, 1))
    raise ValueError(f"channel_shuffle must be one of {CHANNEL_SHUFFLES}, got {mode!r}")


def random_crops(batch: dict, *, patch_size: int, crops_per_image: int, seed: int | None,
                 noise_seed: int | None = None, noise_model: str = "train", channel_shuffle: str = "none") -> dict:
    """map_batches function: decode PNGs, cut aligned patches. ``seed=None`` gives new
    patches every epoch; a fixed seed repeats the same stream (for tests and benchmarks).

    A row without a noisy side (a clean photo, ingested with ``--noise fresh``) gets camera
    noise synthesized here, on each crop, with a new camera every time unless ``noise_seed``
    is fixed. The output is the same either way: {"clean", "noisy"} (N, 3, P, P) float32.
    ``channel_shuffle`` (:func:`channel_orders`) puts both sides of each crop in one random
    channel order: a model trained on a few photos otherwise learns their hues and fails on
    others (docs/evaluation.md).

    A plain function, not a callable class: Ray Data runs it as tasks fused with the
    Parquet read, where a class would start an actor pool (one actor first) every epoch.
    """
    keys = [str(k) for k in batch["key"]]
    entropy = None if seed is None else [seed, _key_digest("\0".join(keys))]
    rng = np.random.default_rng(entropy)
    cleans, noisies = [], []
    for key, clean_png, noisy_png in zip(keys, batch["clean"], batch["noisy"]):
        if noisy_png is None:
            c, n = fresh_noise_crops(decode_png_float(clean_png), key=key, patch_size=patch_size,
                                     crops=crops_per_image, rng=rng, noise_seed=noise_seed, model=noise_model)
        else:
            c, n = aligned_crops(decode_png_float(clean_png), decode_png_float(noisy_png),
                                 patch_size=patch_size, crops=crops_per_image, rng=rng)
        if channel_shuffle != "none":
            orders = channel_orders(len(c), channel_shuffle, rng)[:, :, None, None]
            c, n = np.take_along_axis(c, orders, axis=1), np.take_along_axis(n, orders, axis=1)
        cleans.append(c)
        noisies.append(n)
    return {"clean": np.concatenate(cleans), "noisy": np.concatenate(noisies)}


def _shard_patches(batch: dict, *, settings: Settings, batch_size: int, **crop_args):
    """map_batches generator over shard items: read each shard, yield patches ``batch_size`` pairs at a time."""
    for uri, path, crops in zip(batch["uri"], batch["path"], batch["crops"]):
        fs, _ = arrow_fs_for(str(uri), settings)
        table = pq.read_table(str(path), filesystem=fs, columns=["key", "clean", "noisy"])
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            yield random_crops({name: chunk.column(name).to_pylist() for name in chunk.column_names},
                               crops_per_image=int(crops), **crop_args)


def mix_crops(pairs: dict[str, int], weights: dict[str, float], crops_per_image: int) -> dict[str, int]:
    """Crops per pair of each dataset so that dataset ``d`` gives a ``weights[d]`` share of the
    patches of an epoch, and the epoch keeps the size of the first dataset's (pairs x crops).

    A dataset with weight 0 gets 0 crops (it is not read).
    """
    if not pairs or any(n <= 0 for n in pairs.values()):
        raise DatasetError(f"every mixed dataset needs training pairs, got {pairs}")
    total_weight = sum(weights.values())
    if total_weight <= 0:
        raise DatasetError("the mixing weights sum to 0: nothing to train on")
    epoch = next(iter(pairs.values())) * crops_per_image
    return {uri: (max(1, round(epoch * weights[uri] / total_weight / n)) if weights[uri] > 0 else 0)
            for uri, n in pairs.items()}


def training_patches(dataset_uri: str, settings: Settings, *, patch_size: int, crops_per_image: int = 8,
                     split: str = "train", seed: int | None = None, batch_size: int = 4,
                     num_cpus: float = 0.5, noise_seed: int | None = None, noise_model: str = "train",
                     synthetic: str | None = None, synthetic_weight: float = 0.5, channel_shuffle: str = "none"):
    """Streaming Ray Dataset of aligned random patches {"clean", "noisy"}: float32 (3,P,P) in [0,1].

    Pairs with a noisy side are cropped as stored; clean photos get fresh camera noise per crop
    (:func:`random_crops`). ``synthetic`` names a second dataset (of clean photos, usually) mixed
    in so that it gives a ``synthetic_weight`` share of the patches (:func:`mix_crops`).

    One task per shard reads it with pyarrow and cuts its patches. Ray 2.60's
    ``read_parquet`` spent 15-25 s per epoch listing two known files on the local
    stack (benchmarks/bench_reader.py); the shard list is known, so it is not listed again.
    Each task asks for ``num_cpus`` (half a CPU by default) so that a small cluster whose
    CPUs are partly held by train workers can still schedule the reader.
    """
    import ray.data

    crops = {dataset_uri: crops_per_image}
    if synthetic is not None:
        pairs = {uri: int((read_card(uri, settings).get("counts") or {}).get(split) or 0)
                 for uri in (dataset_uri, synthetic)}
        crops = mix_crops(pairs, {dataset_uri: 1.0 - synthetic_weight, synthetic: synthetic_weight},
                          crops_per_image)
    per_dataset = [[{"uri": uri, "path": path, "crops": n} for path in split_files(uri, split, settings)]
                   for uri, n in crops.items() if n > 0]
    # Interleaved, so both datasets are read from the start of every epoch.
    items = [item for group in itertools.zip_longest(*per_dataset) for item in group if item is not None]
    crop_args = {"patch_size": patch_size, "seed": seed, "noise_seed": noise_seed, "noise_model": noise_model,
                 "channel_shuffle": channel_shuffle}
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _shard_patches, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"settings": settings, "batch_size": batch_size, **crop_args})


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
            if row["noisy"] is None:
                raise DatasetError(f"{split} pair {row['key']} of {dataset_uri} has no noisy side (a clean photo "
                                   f"for fresh noise); validation needs fixed pairs: ingest with --noise fresh "
                                   f"(val pairs get fixed noise) or --noise camera")
            pairs.append({"key": row["key"],
                          "clean": center_crop(decode_png_float(row["clean"]), crop),
                          "noisy": center_crop(decode_png_float(row["noisy"]), crop)})
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs
