"""The ingest stage: a source of pairs (or of clean photos) -> Parquet shards, a card, a quarantine.

How the work is shaped, so the driver's memory stays small whatever the source size:

1. the driver only lists names (:func:`pipeline.pairs.discover`) and fixes each pair's split
   from its key (or group), never from listing order;
2. pairs are cut, per split and in key order, into shards of ``pairs_per_shard``: shard ``n``
   of a split is always ``DEST/<split>/part-<n>.parquet`` for the same source and settings;
3. one Ray task per shard reads, validates (or synthesizes noise), encodes PNGs and writes
   its own shard atomically; it hands back only keys, hashes, sizes and rejections;
4. the driver writes ``quarantine.json``, then ``dataset.json`` last: a dataset is complete
   exactly when its card exists.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError, validation_problems
from pipeline.images import ImageError, encode_png, to_float, to_uint8, to_uint16
from pipeline.pairs import LAYOUTS, Pair, dataset_hash, discover, load_pair, pair_hash, resolve_split
from pipeline.settings import Settings
from pipeline.shards import CARD, QUARANTINE, SPLITS, write_json, write_shard
from pipeline.storage import check_storage, fsspec_for, is_s3, join, strip_scheme
from pipeline.version import code_version

DEMO_SOURCE = "demo:"  # scikit-image's training photos (train) + the validation blocks (val)
DEMO_TEST_SOURCE = "demo-test:"  # the test blocks: test photos, the held-out test camera (split test)
LEAVES_SOURCE = "leaves:"  # procedural dead-leaves images (train only), to mix into training (data.synthetic)
DEMO_SOURCES = (DEMO_SOURCE, DEMO_TEST_SOURCE, LEAVES_SOURCE)  # built in: nothing to download
DEMO_VARIANTS = 2  # noisy variants per demo training photo with --noise camera
LEAVES_VARIANTS = 4  # and per leaves: image
# One demo training photo per shard, so the reader's tasks spread over the cluster; the small
# validation and test blocks go 64 to a shard.
DEMO_PHOTOS_PER_SHARD, DEMO_BLOCKS_PER_SHARD = 1, 64
NOISE_MODES = ("camera", "fresh", "test-camera")


class IngestError(PipelineError):
    """The ingest cannot start or cannot finish; nothing incomplete is left marked as a dataset."""


class IngestConfig(BaseModel):
    """Everything one ingest run depends on; validated once, recorded in the card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="local folder or s3:// prefix ('demo:' / 'demo-test:': the bundled photos; "
                                    "'leaves:': procedural dead-leaves images)")
    dest: str = Field(description="s3:// prefix (or local folder) that receives the dataset")
    layout: Literal[LAYOUTS]  # type: ignore[valid-type]
    name: str | None = Field(None, description="dataset name; default: the last part of dest")
    val_fraction: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    noise: Literal[NOISE_MODES] | None = Field(  # type: ignore[valid-type]
        None, description="layout 'clean' only: 'camera' synthesizes the noisy side here (training camera); "
                          "'fresh' stores train photos clean, for new noise on every read, and gives val pairs "
                          "fixed noise; 'test-camera' synthesizes with the held-out test camera")
    variants: int = Field(1, ge=1, description="noisy variants per clean photo")
    recolor: bool = Field(False, description="noise camera: in train, every variant after the first shows the "
                                             "photo in new scene colours (saturation, tint), noise added after")
    photo_sizes: tuple[int, ...] | None = Field(
        None, description="demo: only: long sides the training photos are stored at, one copy per size "
                          "(a photo is never upscaled), comma-separated; default 384")
    clean_template: str | None = None
    noisy_template: str | None = None
    min_size: int = Field(64, ge=1, description="shortest side accepted: the training patch size")
    pairs_per_shard: int = Field(8, ge=1, description="source pairs per Parquet shard (and per Ray task)")
    task_cpus: float = Field(1.0, gt=0, description="CPUs reserved per shard task (fractions share busy nodes)")
    strict: bool = False
    overwrite: bool = False

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, values: dict) -> dict:
        if isinstance(values, dict) and values.get("source") in DEMO_SOURCES:
            source = values["source"]
            noise = values.get("noise") or {DEMO_SOURCE: "fresh", LEAVES_SOURCE: "camera"}.get(source, "test-camera")
            variants = LEAVES_VARIANTS if source == LEAVES_SOURCE else DEMO_VARIANTS
            defaults = {"layout": "clean", "noise": noise, **({"variants": variants} if noise == "camera" else {}),
                        # one demo photo per reader task; the leaves: images are many and small
                        **({} if source == LEAVES_SOURCE else {"pairs_per_shard": DEMO_PHOTOS_PER_SHARD})}
            values = {**values, **{k: v for k, v in defaults.items() if values.get(k) is None}}
        return values

    @field_validator("photo_sizes", mode="before")
    @classmethod
    def _sizes(cls, value):
        return tuple(int(v) for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "IngestConfig":
        if self.photo_sizes is not None:
            if self.source != DEMO_SOURCE:
                raise ValueError("--photo-sizes applies to the demo: source only")
            if not self.photo_sizes or min(self.photo_sizes) < self.min_size:
                raise ValueError(f"--photo-sizes needs one or more sizes of at least {self.min_size} (--min-size)")
        if self.source in DEMO_SOURCES and self.layout != "clean":
            raise ValueError("the demo sources are clean photos: use layout 'clean' (the default)")
        if self.source == DEMO_TEST_SOURCE and self.noise != "test-camera":
            raise ValueError("the demo test set is made with the held-out camera: --noise test-camera (the default)")
        if self.source in (DEMO_SOURCE, LEAVES_SOURCE) and self.noise == "test-camera":
            raise ValueError(f"the {self.source} training set never uses the test camera: --noise fresh or camera")
        if self.layout == "clean" and self.noise is None:
            raise ValueError("layout 'clean' has no noisy side: add --noise fresh (or camera)")
        if self.noise is not None and self.layout != "clean":
            raise ValueError("--noise applies to layout 'clean' only (other layouts bring their noisy side)")
        if self.recolor and self.noise != "camera":
            raise ValueError("--recolor needs --noise camera")
        if self.variants > 1 and self.noise is None:
            raise ValueError("--variants needs --noise")
        if (self.clean_template or self.noisy_template) and self.layout != "mirrored":
            raise ValueError("--clean-template/--noisy-template apply to layout 'mirrored' only")
        if self.source not in DEMO_SOURCES and _nested(self.source, self.dest):
            raise ValueError(f"dest {self.dest} and source {self.source} overlap; the source is never written to")
        return self

    @property
    def dataset_name(self) -> str:
        return self.name or self.dest.rstrip("/").rsplit("/", 1)[-1]


def make_config(**values) -> IngestConfig:
    """An :class:`IngestConfig`, or one readable line saying what is wrong."""
    try:
        return IngestConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise IngestError("invalid ingest settings: " + validation_problems(exc)) from None


def _nested(a: str, b: str) -> bool:
    if is_s3(a) != is_s3(b):
        return False
    a, b = strip_scheme(a).rstrip("/") + "/", strip_scheme(b).rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


# ---------------------------------------------------------------- one shard (runs in a Ray task)

@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    pairs: tuple[Pair, ...]


@functools.lru_cache(maxsize=4)
def _uri(source: str, path: str | None) -> str | None:
    return None if path is None else (f"s3://{path}" if is_s3(source) else path)


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _quantize_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    return to_uint16(values) if like.dtype == np.uint16 else to_uint8(values)


def pair_rows(pair: Pair, clean: np.ndarray, noisy: np.ndarray | None, *, split: str,
              config: IngestConfig, source: str) -> list[dict]:
    """Shard rows of one loaded pair; a clean-only photo gives ``variants`` synthesized pairs, or,
    with ``--noise fresh`` in the train split, one row without a noisy side (the reader adds noise)."""
    from pipeline.noise import recolor_scene, synthesize_pair

    meta = {**pair.meta, "noisy_source": _uri(source, pair.noisy_path), "bit_depth": clean.dtype.itemsize * 8}
    if noisy is not None:
        sides = [(pair.key, clean, noisy, meta)]
    elif config.noise == "fresh" and split == "train":
        sides = [(pair.key, clean, None, {**meta, "noise": "fresh"})]
    else:
        model = camera_for(config.noise)
        sides = []
        for variant in range(config.variants):
            # Seeded by (seed, key, variant): the same photo gets the same noise in any order or shard.
            rng = np.random.default_rng([config.seed, _key_seed(pair.key), variant])
            scene = to_float(clean)
            recolored = config.recolor and variant > 0 and split == "train"  # validation keeps real colours
            if recolored:
                scene = recolor_scene(scene, np.random.default_rng([config.seed, _key_seed(pair.key), variant, 1]))
            target, noisy_float, camera = synthesize_pair(scene, rng, model=model)
            sides.append((f"{pair.key}_v{variant}", _quantize_like(target, clean), _quantize_like(noisy_float, clean),
                          {**meta, "noise": config.noise, "variant": variant, "camera": camera,
                           **({"recolored": True} if recolored else {})}))
    rows = []
    for key, clean_pixels, noisy_pixels, row_meta in sides:
        clean_png, noisy_png = encode_png(clean_pixels), None if noisy_pixels is None else encode_png(noisy_pixels)
        rows.append({"key": key, "split": split, "clean": clean_png, "noisy": noisy_png,
                     "height": clean_pixels.shape[0], "width": clean_pixels.shape[1],
                     "source": _uri(source, pair.clean_path), "layout": config.layout,
                     "meta": json.dumps(row_meta, sort_keys=True), "pair_hash": pair_hash(clean_png, noisy_png)})
    return rows


def camera_for(noise: str | None):
    """The camera model a noise mode synthesizes with."""
    from pipeline.noise import TEST_CAMERA, TRAIN_CAMERA

    return TEST_CAMERA if noise == "test-camera" else TRAIN_CAMERA


def _rejection(source: str, path: str | None, reason: str, **extra) -> dict:
    return {"path": _uri(source, path), "reason": reason, **extra}


class ShippedFiles:
    """A local source's files, carried to a task on another node through Ray's object store.

    It answers the reads :func:`pipeline.pairs.load_pair` makes; a file the driver could not find
    is missing here too, so the pair is rejected as it would be on the driver's disk.
    """

    protocol = "shipped"

    def __init__(self, refs: dict):
        self.refs, self.loaded = refs, {}

    def cat_file(self, path: str) -> bytes:
        import ray

        if path not in self.refs:
            raise FileNotFoundError(path)
        if path not in self.loaded:
            self.loaded[path] = ray.get(self.refs[path])
        return self.loaded[path]

    def open(self, path: str, mode: str = "rb"):
        return io.BytesIO(self.cat_file(path))

    def isfile(self, path: str) -> bool:
        return path in self.refs


def plan_paths(plan: ShardPlan) -> set[str]:
    return {path for pair in plan.pairs for path in (pair.clean_path, pair.noisy_path) if path}


def ship_files(plan: ShardPlan, shipped: dict) -> dict:
    """Object refs of the plan's local files (each file put once, shared by the shards that read it)."""
    import ray

    refs = {}
    for path in plan_paths(plan):
        if path not in shipped:
            try:
                with open(path, "rb") as handle:
                    shipped[path] = ray.put(handle.read())
            except FileNotFoundError:
                continue
        refs[path] = shipped[path]
    return refs


def ingest_shard(plan: ShardPlan, config: IngestConfig, source: str, settings: Settings,
                 files: dict | None = None) -> dict:
    """Load, check and encode one shard's pairs and write the shard; returns only what the card needs.

    A pair that cannot be used is rejected with its reason. Storage failures (``OSError``)
    propagate so Ray retries the task; the shard is rewritten whole, under the same name.
    ``files`` carries a local source's files when the task may run on another node.
    """
    # One filesystem per worker process, so SIDD's block arrays stay cached in
    # pairs.load_pair across the shards this worker handles.
    fs = ShippedFiles(files) if files is not None else fsspec_for(source, settings, shared=True)[0]
    rows, rejected = [], []
    for pair in plan.pairs:
        try:
            clean, noisy = load_pair(fs, pair, min_size=config.min_size)
            rows += pair_rows(pair, clean, noisy, split=plan.split, config=config, source=source)
        except ImageError as exc:
            rejected.append(_rejection(source, pair.clean_path, exc.reason, key=pair.key,
                                       noisy_path=_uri(source, pair.noisy_path)))
        except (OSError, MemoryError):
            raise
        except Exception as exc:  # e.g. a damaged .mat file: one bad item, not a failed job
            rejected.append(_rejection(source, pair.clean_path, f"unreadable: {type(exc).__name__}: {exc}",
                                       key=pair.key, noisy_path=_uri(source, pair.noisy_path)))
    path, size = write_shard(rows, config.dest, plan.split, plan.index, settings) if rows else (None, 0)
    return {"split": plan.split, "path": path, "bytes": size, "pairs": len(plan.pairs), "rejected": rejected,
            "rows": [{"key": r["key"], "pair_hash": r["pair_hash"], "pixels": r["height"] * r["width"]}
                     for r in rows]}


# ---------------------------------------------------------------- the driver

def plan_shards(pairs: list[Pair], config: IngestConfig) -> list[ShardPlan]:
    """Shards per split in key order: the same source always gives the same shard names and contents."""
    by_split: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    for pair in pairs:
        by_split[resolve_split(pair, config.val_fraction, config.seed)].append(pair)
    plans = []
    for split, members in by_split.items():
        members.sort(key=lambda p: p.key)
        blocks = config.source in DEMO_SOURCES and split != "train"
        size = max(config.pairs_per_shard, DEMO_BLOCKS_PER_SHARD) if blocks else config.pairs_per_shard
        plans += [ShardPlan(split, n, tuple(members[start:start + size]))
                  for n, start in enumerate(range(0, len(members), size))]
    return plans


def _has_card(config: IngestConfig, settings: Settings) -> bool:
    fs, root = fsspec_for(config.dest, settings)
    return fs.exists(join(root, CARD))


def _check_dest(config: IngestConfig, settings: Settings) -> None:
    fs, root = fsspec_for(config.dest, settings)
    if config.overwrite:
        return
    if fs.exists(join(root, CARD)):
        raise IngestError(f"{config.dest} already holds a dataset ({CARD}); pass --overwrite to replace it")
    for split in SPLITS:
        # Only Parquet files count: SeaweedFS can keep an empty folder marker after a removal.
        if fs.exists(join(root, split)) and any(p.endswith(".parquet") for p in fs.find(join(root, split))):
            raise IngestError(f"{config.dest}/{split} holds files of an unfinished ingest (no {CARD}); "
                              f"pass --overwrite to replace them")


def _clear_dest(config: IngestConfig, settings: Settings) -> None:
    """Remove an old dataset: the card first, so it stops counting as complete, then its shards."""
    fs, root = fsspec_for(config.dest, settings)
    for name in (CARD, QUARANTINE):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name))
    _remove_shards(config, settings)


def _remove_shards(config: IngestConfig, settings: Settings) -> None:
    fs, root = fsspec_for(config.dest, settings)
    for split in SPLITS:
        if fs.exists(join(root, split)):
            fs.rm(join(root, split), recursive=True)


class _Progress:
    """A line every ``every`` pairs (and at the end): done/total, rejected, pairs/s."""

    def __init__(self, total: int, log: Callable[[str], None], every: int | None = None):
        self.total, self.log = total, log
        self.every = every or max(1, min(100, total // 10))
        self.done = self.rejected = self.next_line = 0
        self.start = time.monotonic()

    def add(self, pairs: int, rejected: int) -> None:
        self.done += pairs
        self.rejected += rejected
        if self.done >= self.next_line or self.done == self.total:
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            self.log(f"ingest: {self.done}/{self.total} pairs, {self.rejected} rejected, {rate:.2f} pairs/s")
            self.next_line = (self.done // self.every + 1) * self.every


def _run_shards(plans: list[ShardPlan], config: IngestConfig, source: str, settings: Settings,
                log: Callable[[str], None]) -> list[dict]:
    import ray

    from pipeline.cluster import tasks_share_this_disk

    task = ray.remote(ingest_shard).options(num_cpus=config.task_cpus, max_retries=2, retry_exceptions=[OSError])
    # A local source is read here and shipped when tasks may run on nodes without this disk; a
    # window of shards in flight bounds what the object store holds of it at once.
    ship = not is_s3(source) and not tasks_share_this_disk()
    shipped: dict = {}
    readers = collections.Counter(path for plan in plans for path in plan_paths(plan))
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / config.task_cpus)) if ship else len(plans)
    queue = list(plans)
    pending: dict = {}
    progress = _Progress(sum(len(p.pairs) for p in plans), log)
    results = []
    try:
        while pending or queue:
            while queue and len(pending) < window:
                plan = queue.pop(0)
                files = ship_files(plan, shipped) if ship else None
                pending[task.remote(plan, config, source, settings, files)] = plan
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                plan = pending.pop(ref)
                for path in plan_paths(plan):
                    readers[path] -= 1
                    if not readers[path]:
                        shipped.pop(path, None)  # no shard still to run reads it: let the store free it
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    line = (str(cause).strip() or type(cause).__name__).splitlines()[0]
                    raise IngestError(f"shard {plan.split}/part-{plan.index:05d} failed after retries "
                                      f"({type(cause).__name__}: {line}); no dataset was written") from None
                results.append(result)
                progress.add(result["pairs"], len(result["rejected"]))
    except BaseException:
        for ref in pending:  # no task may write a shard after the caller cleans up
            ray.cancel(ref, force=True)
        raise
    return results


def _card(config: IngestConfig, results: list[dict], source_pairs: int, rejected: int,
          extra: dict | None = None) -> dict:
    hashes = {row["key"]: row["pair_hash"] for result in results for row in result["rows"]}
    counts = {split: sum(len(r["rows"]) for r in results if r["split"] == split) for split in SPLITS}
    sizes = {split: {"pixels": sum(row["pixels"] for r in results if r["split"] == split for row in r["rows"]),
                     "bytes": sum(r["bytes"] for r in results if r["split"] == split)} for split in SPLITS}
    files = {split: sorted(f"{split}/{r['path'].rsplit('/', 1)[-1]}" for r in results
                           if r["split"] == split and r["path"]) for split in SPLITS}
    return {
        "name": config.dataset_name,
        "source": config.source if is_s3(config.source) or config.source in DEMO_SOURCES
        else strip_scheme(config.source),
        "layout": config.layout,
        "templates": {"clean": config.clean_template, "noisy": config.noisy_template},
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "min_size": config.min_size,
        "noise": {"model": config.noise, "variants": config.variants, "recolor": config.recolor,
                  "camera": camera_for(config.noise).ranges()} if config.noise else None,
        "counts": {**counts, "total": sum(counts.values()), "source_pairs": source_pairs, "rejected": rejected},
        "sizes": {**sizes, "total": {k: sum(s[k] for s in sizes.values()) for k in ("pixels", "bytes")}},
        "files": files,
        "pair_hashes": dict(sorted(hashes.items())),
        "dataset_hash": dataset_hash(hashes),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "code_version": code_version(),
        **(extra or {}),
    }


def ingest(config: IngestConfig, settings: Settings, *, log: Callable[[str], None] = print) -> dict:
    """Ingest ``config.source`` into ``config.dest``; returns the dataset card.

    Raises :class:`IngestError` when no pair is usable, or with ``strict`` when anything was
    rejected (then no shards are left); ``quarantine.json`` says why in both cases.
    """
    if config.source in DEMO_SOURCES:
        with tempfile.TemporaryDirectory(prefix="denoise-demo-") as folder:
            if config.source == LEAVES_SOURCE:
                pairs, extra = write_leaves_source(folder)
            else:
                pairs, extra = write_demo_source(folder, test=config.source == DEMO_TEST_SOURCE, seed=config.seed,
                                                 sizes=config.photo_sizes)
            return _ingest(config, settings, source=folder, log=log, found=(pairs, []), extra=extra)
    return _ingest(config, settings, source=config.source, log=log)


def write_leaves_source(folder: str) -> tuple[list[Pair], dict]:
    """Write the dead-leaves images (:func:`pipeline.demo_data.leaves_images`) as PNGs under
    ``folder``; their pairs (all train: they are for mixing into training, never for judging) and
    what the card says about them."""
    from pathlib import Path

    from pipeline.demo_data import LEAVES_SEED, PHOTO_SIZE, leaves_images

    root = Path(folder) / "train"
    root.mkdir(parents=True)
    pairs = []
    for index, (key, image) in enumerate(leaves_images()):
        path = root / f"{key}.png"
        path.write_bytes(encode_png(image))
        pairs.append(Pair(key, str(path), None, {"gray": bool(index % 2)}, split="train"))
    return pairs, {"leaves": {"images": len(pairs), "gray": sum(p.meta["gray"] for p in pairs), "size": PHOTO_SIZE,
                              "seed": LEAVES_SEED, "generator": "pipeline.demo_data.dead_leaves"}}


def write_demo_source(folder: str, *, test: bool, seed: int,
                      sizes: tuple[int, ...] | None = None) -> tuple[list[Pair], dict]:
    """Write the demo photos and blocks as PNGs under ``folder``; their pairs (splits fixed) and
    what the card says about them (the photo split and sizes, the noise levels, the blocks' noisy PSNR).

    Each training photo is written once per size in ``sizes``, keyed ``<photo>`` at the default
    size and ``<photo>_<size>`` at the others; a size that gives a copy already written (the
    photo is smaller than it) is skipped."""
    from pathlib import Path

    from pipeline.demo_data import (PHOTO_SIZE, SHOT_LEVELS, TEST_PHOTOS, TRAIN_PHOTOS, VAL_PHOTOS, demo_image,
                                    psnr_summary, test_blocks, validation_blocks)
    from pipeline.metrics import psnr

    root = Path(folder)
    pairs = []
    if not test:
        (root / "train").mkdir(parents=True)
        for name in TRAIN_PHOTOS:
            shapes = set()
            for size in sizes or (PHOTO_SIZE,):
                photo = demo_image(name, size)
                if photo.shape in shapes:
                    continue
                shapes.add(photo.shape)
                key = name if size == PHOTO_SIZE else f"{name}_{size}"
                path = root / "train" / f"{key}.png"
                path.write_bytes(encode_png(photo))
                pairs.append(Pair(key, str(path), None, {"photo": name, "size": size}, split="train"))
    split = "test" if test else "val"
    blocks = test_blocks(seed=seed) if test else validation_blocks(seed=seed)
    for side in ("clean", "noisy"):
        (root / split / side).mkdir(parents=True)
    for item in blocks:
        paths = {side: root / split / side / f"{item['key']}.png" for side in ("clean", "noisy")}
        for side, path in paths.items():
            path.write_bytes(encode_png(item[side]))
        pairs.append(Pair(item["key"], str(paths["clean"]), str(paths["noisy"]), item["meta"], split=split))
    scores = [psnr(to_float(b["clean"]), to_float(b["noisy"])) for b in blocks]
    strata = [(b["meta"]["photo"], b["meta"]["level"]) for b in blocks]
    return pairs, {"demo": {
        "photos": {"train": list(TRAIN_PHOTOS), "val": list(VAL_PHOTOS), "test": list(TEST_PHOTOS)},
        **({} if test else {"train_photo_sizes": list(sizes or (PHOTO_SIZE,))}),
        "blocks": {"split": split, "side": blocks[0]["clean"].shape[0], "shot_levels": list(SHOT_LEVELS),
                   "camera": camera_for("test-camera" if test else "camera").name,
                   "noisy_psnr": psnr_summary(scores, strata)}}}


def _ingest(config: IngestConfig, settings: Settings, *, source: str, log: Callable[[str], None],
            found: tuple[list[Pair], list] | None = None, extra: dict | None = None) -> dict:
    from pipeline.cluster import init_ray, require_shared

    for uri in {source, config.dest}:
        if is_s3(uri):
            check_storage(settings, bucket=strip_scheme(uri).split("/", 1)[0])
    _check_dest(config, settings)
    fs, root = fsspec_for(source, settings)
    try:
        pairs, found_rejected = found or discover(fs, root, config.layout, clean_template=config.clean_template,
                                                  noisy_template=config.noisy_template)
    except ValueError as exc:
        raise IngestError(str(exc)) from None
    discovery_rejected = [_rejection(source, r.path, r.reason) for r in found_rejected]
    plans = plan_shards(pairs, config)
    log(f"found {len(pairs)} pairs in {config.source} ({config.layout}); {len(discovery_rejected)} files rejected "
        f"while pairing; {len(plans)} shards to write")
    quarantine_uri = join(config.dest, QUARANTINE)
    if not pairs:
        for item in discovery_rejected[:5]:
            log(f"rejected {item['path']}: {item['reason']}")
        where = "above"
        if not _has_card(config, settings):  # an existing dataset keeps its own quarantine
            _write_quarantine(config, settings, discovery_rejected)
            where = f"in {quarantine_uri}"
        raise IngestError(f"no pairs found in {config.source} for layout {config.layout!r}; reasons {where}")
    init_ray(settings)
    require_shared(settings, DEST=config.dest)  # shards are written by the tasks, wherever they run
    _clear_dest(config, settings)
    try:
        results = _run_shards(plans, config, source, settings, log)
    except BaseException:
        _remove_shards(config, settings)
        raise
    rejected = discovery_rejected + [r for result in results for r in result["rejected"]]
    _write_quarantine(config, settings, rejected)
    card = _card(config, results, len(pairs), len(rejected), extra)
    if not card["counts"]["total"]:
        _remove_shards(config, settings)
        raise IngestError(f"no valid pair in {config.source}: all {len(rejected)} rejected; "
                          f"reasons in {quarantine_uri}")
    if config.strict and rejected:
        _remove_shards(config, settings)
        raise IngestError(f"{len(rejected)} items rejected and --strict given: no dataset written; "
                          f"reasons in {quarantine_uri}")
    write_json(config.dest, CARD, card, settings)
    counts = card["counts"]
    log(f"ingested {counts['total']} pairs (train {counts['train']}, val {counts['val']}, test {counts['test']}) from "
        f"{counts['source_pairs']} source pairs; rejected {counts['rejected']} -> {quarantine_uri}")
    log(f"dataset {config.dest}: {join(config.dest, 'train')}/ ({len(card['files']['train'])} shards), "
        f"{join(config.dest, 'val')}/ ({len(card['files']['val'])} shards), card {join(config.dest, CARD)}, "
        f"dataset_hash {card['dataset_hash'][:16]}")
    if counts["val"] == 0 and counts["test"] == 0 and config.val_fraction > 0 and config.source != LEAVES_SOURCE:
        log(f"warning: no pair landed in val (val_fraction {config.val_fraction}); training needs some: "
            f"raise --val-fraction or change --seed")
    return card


def _write_quarantine(config: IngestConfig, settings: Settings, rejected: list[dict]) -> None:
    items = sorted(rejected, key=lambda r: (r["path"] or "", r["reason"]))
    write_json(config.dest, QUARANTINE, {"source": config.source, "count": len(items), "rejected": items}, settings)
