"""Nightly batch denoising: the Ray Data graph from an input prefix to denoised PNGs, and its model actor.

    list sources (driver) -> expand archives, checksum, skip done (tasks)
      -> decode (tasks) -> denoise (actor pool, model loaded once per actor, tiled sampler)
      -> write PNG + metrics + state record (tasks) -> small status rows back to the driver
      -> merge the records into manifest.parquet / errors.parquet (driver) -> MLflow run

What is done, what failed and which run owns OUTPUT is the ledger's business
(``pipeline/ledger.py``): the driver takes OUTPUT's run lease before any cluster work and
keeps it renewed until the merge. Every per-item failure (unreadable archive member,
undecodable image, inference or write error, a task killed after its retries) becomes an
error row and the run goes on; an MLflow outage after the merge only costs a warning, since
the images and the manifest are the product.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.archives import Item, Limits, Source, iter_items, kind_of, list_sources
from pipeline.diffusion import DEFAULT_STEPS, SAMPLERS
from pipeline.errors import PipelineError, first_line, validation_problems
from pipeline.images import ImageError, decode_image, encode_png, reduce_to_uint8, to_float, to_uint8, to_uint16
from pipeline.ledger import (
    RunLease,
    StateIndex,
    forget_done,
    item_name,
    limits_tag,
    merge_state,
    printable,
    read_state_index,
    recipe_tag,
    record_done,
    record_error,
    safe_key,
)
from pipeline.settings import Settings
from pipeline.storage import fsspec_for, join, strip_scheme, write_atomic
from pipeline.tracking import ensure_experiment, source_tags, ui_url

DEFAULT_MODEL_URI = "models:/denoiser@champion"
UNDATED = "undated"
PREVIEW_SIDE = 128
BYTES_COLUMNS = ("pixels", "denoised")


class DenoiseConfigError(PipelineError, ValueError):
    """Arguments of the batch-denoise job that do not fit together."""


class RunFailed(PipelineError):
    """The cluster could not finish the run; the items finished so far are recorded."""


class DenoiseConfig(BaseModel):
    """Everything one batch-denoise run needs, validated once at the edge (the job's CLI is built from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="s3://bucket/prefix or local folder of images and .tar/.tar.gz/.zip archives")
    output: str = Field(description="s3://bucket/prefix or local folder for images, manifest and state")
    model: str = Field(DEFAULT_MODEL_URI, description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint folder")
    reference: str | None = Field(None, description="clean references at REF/<key> (archive members: "
                                                    "REF/<archive>/<member>), for PSNR/SSIM")
    sampler: Literal[tuple(SAMPLERS)] = Field("improved", description="sampler of pipeline/diffusion.py")  # type: ignore[valid-type]
    steps: int = Field(DEFAULT_STEPS, ge=1, description="sampling steps K (at most the model's T; direct makes one call)")
    self_ensemble: bool = Field(False, description="average every model call over the tile's 8 flips and quarter "
                                                   "turns: better images for 8x the model calls")
    tile: int = Field(512, ge=32, description="tile side for larger images")
    overlap: int = Field(32, ge=0, description="pixels shared by neighbouring tiles")
    batch_size: int = Field(4, ge=1, description="tiles per model call")
    workers: int = Field(1, ge=1, description="model actors")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per model actor")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs (and torch threads) per model actor")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs per read/decode and write/score task")
    task_memory_mb: int = Field(1024, ge=1, description="memory reserved per read/decode and write/score task")
    passes: int = Field(2, ge=1, description="runs of the graph: a later one takes only the inputs of which no "
                                             "item came back (their tasks died: a node lost, a worker killed for "
                                             "memory)")
    actors_wait_s: int = Field(900, ge=1, description="how long the model actors may take to be placed before any "
                                                       "item is read (a cluster may be adding nodes for them)")
    task_retries: int = Field(2, ge=0, description="retries of a Ray task or model actor that died (killed for "
                                                   "memory, node lost) before its items become error rows")
    date: str | None = Field(None, description="YYYY-MM-DD or 'today' (UTC): write under OUTPUT/<date>/")
    experiment: str = Field("batch-denoise", description="MLflow experiment")
    max_megapixels: float = Field(100.0, gt=0, description="larger images are rejected (smaller ones are tiled)")
    max_image_mb: float = Field(1024.0, gt=0, description="largest image file or archive member, in MiB")
    samples: int = Field(3, ge=0, description="before/after crops logged to MLflow")
    lease_seconds: float = Field(600.0, ge=10, description="OUTPUT's run lease: renewed every quarter of this; a run that "
                                                     "stopped renewing it this long ago is taken over")

    @field_validator("input", "output", "reference")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Local paths become absolute (tasks may run in another working directory)."""
        if value is None or value.startswith("s3://"):
            return value.rstrip("/") if value else value
        if "://" in value:
            raise ValueError(f"only s3:// URIs and local paths are supported, got {value!r}")
        return strip_scheme(value)

    @field_validator("date")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        if value == "today":  # lets a schedule pass a fixed command line
            return dt.datetime.now(dt.timezone.utc).date().isoformat()
        if value is not None:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"must be YYYY-MM-DD, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DenoiseConfig":
        if self.overlap >= self.tile:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile ({self.tile})")
        inp, out = (strip_scheme(p).rstrip("/") + "/" for p in (self.input, self.output))
        if out.startswith(inp) or inp.startswith(out):
            raise ValueError("INPUT and OUTPUT must not contain one another")
        return self

    @classmethod
    def build(cls, **values: Any) -> "DenoiseConfig":
        """Validate, turning pydantic's report into one readable line."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise DenoiseConfigError(validation_problems(exc)) from None

    @property
    def partition(self) -> str:
        return self.date or UNDATED

    @property
    def out_root(self) -> str:
        """Where images/, manifest.parquet and errors.parquet of this run go."""
        return join(self.output, self.date) if self.date else self.output.rstrip("/")

    @property
    def limits(self) -> Limits:
        return Limits(max_member_bytes=int(self.max_image_mb * (1 << 20)))

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @property
    def sampler_steps(self) -> int:
        """The K the sampler really runs (``direct`` is one model call)."""
        return 1 if self.sampler == "direct" else self.steps

    @property
    def limits_tag(self) -> str:
        return limits_tag(max_megapixels=self.max_megapixels, max_image_mb=self.max_image_mb)

    def recipe_tag(self, model_ref: str, model_version: str) -> str:
        return recipe_tag(model_uri=model_ref, model_version=model_version, sampler=self.sampler,
                          steps=self.sampler_steps, self_ensemble=self.self_ensemble)

    def buckets(self) -> list[str]:
        """The S3 buckets INPUT, OUTPUT, REFERENCE and a checkpoint-folder MODEL name."""
        uris = [u for u in (self.input, self.output, self.reference, self.model) if u and u.startswith("s3://")]
        return sorted({strip_scheme(u).split("/", 1)[0] for u in uris})


# -- naming ------------------------------------------------------------------------


def output_key(key: str) -> str:
    """Relative output path: the key, with ``.png`` appended unless it already ends so."""
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"key {key!r} is not a safe relative path")
    return key if key.lower().endswith(".png") else f"{key}.png"


def ray_submission_id() -> str | None:
    """The ``ray job submit`` id of this driver, if it was submitted as a Ray job.

    Ray passes it to the driver only inside the job config JSON
    (``RAY_JOB_CONFIG_JSON_ENV_VAR`` -> metadata.job_submission_id).
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def weights_version(model) -> str:
    """A checkpoint folder's model version: the digest of its weights (a registry version has a number)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


STATUS_COLUMNS = ["key", "status", "reason", "input_uri", "output_uri", "checksum", "height", "width", "bits",
                  "note", "node", "seconds", "psnr_in", "psnr_out", "ssim_in", "ssim_out", "sigma_in", "sigma_out"]
FLOAT_COLUMNS = ("seconds", "psnr_in", "psnr_out", "ssim_in", "ssim_out", "sigma_in", "sigma_out")


# -- stages (plain functions of rows, so tests can call them without Ray) ------------


def _text(value: str) -> str:
    try:
        return safe_key(value)
    except UnicodeError:
        return printable(value)


def _row(key: str, uri: str, *, status: str, checksum: str = "", reason: str = "", stage: str = "",
         pixels: np.ndarray | None = None) -> dict:
    """A work item between stages; pixels travel as raw bytes (H x W x 3, 8 or 16 bits).

    Every text is valid UTF-8 from here on (Ray Data's Arrow blocks and Parquet need it).
    """
    shape = pixels.shape if pixels is not None else (0, 0)
    return {"key": key, "input_uri": _text(uri), "checksum": checksum, "status": status, "reason": printable(reason),
            "stage": stage, "retry": False, "pixels": pixels.tobytes() if pixels is not None else b"",
            "height": shape[0], "width": shape[1], "bits": pixels.dtype.itemsize * 8 if pixels is not None else 0}


def expand_source(source_row: dict, *, settings: Settings, limits: Limits, index: StateIndex, max_pixels: int,
                  archive_prefixes: tuple[str, ...] = ()) -> Iterator[dict]:
    """One input file -> its decoded work items: ``pending`` (with pixels), ``skipped`` or ``failed``.

    A generator, so an archive streams through one member at a time. Whatever goes wrong
    with one item becomes its error row; a source that breaks mid-way gives one more row
    for the rest of it.
    """
    source = Source(source_row["rel"], source_row["uri"], int(source_row["size"]))
    if source.kind == "image" and source.rel.startswith(archive_prefixes):
        yield _row(_text(source.rel), source.uri, status="failed", stage="list",
                   reason="key collides with the members of an archive of the same name")
        return
    items = iter_items(source, settings, limits)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as exc:  # the source cannot be read further; what came before stays valid
            yield _row(_text(source.rel), source.uri, status="failed", stage="read",
                       reason=f"read failed: {first_line(exc)}")
            return
        yield _expand_item(item, index=index, max_pixels=max_pixels)


def _expand_item(item: Item, *, index: StateIndex, max_pixels: int) -> dict:
    try:
        key = safe_key(item.key)
    except UnicodeError as exc:
        return _row(printable(item.key), item.uri, status="failed", stage="read",
                    reason=f"key is not valid text: {first_line(exc)}")
    if item.reason is not None:
        return _row(key, item.uri, status="failed", stage="read", reason=item.reason)
    checksum = item.checksum
    if index.skips(item_name(key, checksum)):
        return _row(key, item.uri, status="skipped", checksum=checksum)
    try:
        pixels = decode_image(item.data, max_pixels=max_pixels)
    except ImageError as exc:
        return _row(key, item.uri, status="failed", checksum=checksum, stage="decode", reason=exc.reason)
    except Exception as exc:  # a decoder bug or a file it trips on: this item's error, not the night's
        return _row(key, item.uri, status="failed", checksum=checksum, stage="decode",
                    reason=f"decode failed: {first_line(exc)}")
    return _row(key, item.uri, status="pending", checksum=checksum, pixels=pixels)


def pixels_of(raw: bytes, height: int, width: int, bits: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8 if bits == 8 else np.uint16).reshape(height, width, 3)


class Denoise:
    """The model actor: loads the denoiser once, then denoises one decoded image per call."""

    def __init__(self, *, model_uri: str, settings: Settings, sampler: str, steps: int, tile: int, overlap: int,
                 batch_size: int, self_ensemble: bool = False, threads: int | None = None, denoiser=None):
        import torch

        from pipeline.modelstore import load_denoiser

        if threads:
            torch.set_num_threads(threads)
        import ray

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Where this actor runs, for the manifest's node column (a driver-side test has no Ray).
        self.node = ray.util.get_node_ip_address() if ray.is_initialized() else ""
        settings.apply_mlflow_env()  # models:/ URIs: an authenticated MLflow's credentials came in the settings
        loaded = denoiser or load_denoiser(model_uri, settings)
        loaded.model = loaded.model.to(self.device).eval()
        self.loaded = loaded
        self.options = {"sampler": sampler, "steps": steps, "tile": tile, "overlap": overlap, "batch": batch_size,
                        "self_ensemble": self_ensemble}

    def denoise(self, pixels: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8/uint16 -> the same shape and dtype, denoised."""
        out = self.loaded.denoise(to_float(pixels), **self.options)
        return to_uint8(out) if pixels.dtype == np.uint8 else to_uint16(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = {name: list(values) for name, values in batch.items()}
        columns["denoised"], columns["seconds"] = [], []
        columns["node"] = [self.node] * len(columns["status"])
        for i, status in enumerate(columns["status"]):
            start = time.perf_counter()
            out = b""
            if status == "pending":
                try:
                    pixels = pixels_of(columns["pixels"][i], int(columns["height"][i]), int(columns["width"][i]),
                                       int(columns["bits"][i]))
                    out = self.denoise(pixels).tobytes()
                except Exception as exc:  # one bad item must not stop the night's run
                    columns["status"][i], columns["stage"][i], columns["retry"][i] = "failed", "denoise", True
                    columns["reason"][i] = f"inference failed: {type(exc).__name__}: {exc}".splitlines()[0]
            columns["denoised"].append(out)
            columns["seconds"].append(time.perf_counter() - start)
        # Object arrays keep bytes as they are (numpy's fixed-width bytes would drop trailing NULs).
        return {name: np.array(values, dtype=object) if name in BYTES_COLUMNS else np.asarray(values)
                for name, values in columns.items()}


def _preview(noisy: np.ndarray, denoised: np.ndarray, reference: np.ndarray | None) -> bytes:
    """Centre crops, side by side at full resolution (downscaling would hide the noise)."""
    h, w = noisy.shape[:2]
    side_h, side_w = min(h, PREVIEW_SIDE), min(w, PREVIEW_SIDE)
    y, x = (h - side_h) // 2, (w - side_w) // 2
    crops = [reduce_to_uint8(a[y:y + side_h, x:x + side_w]) for a in (noisy, denoised, reference) if a is not None]
    gap = np.full((side_h, 4, 3), 255, np.uint8)
    return encode_png(np.concatenate([c for crop in crops for c in (crop, gap)][:-1], axis=1))


def _reference(reference_root: str | None, key: str, settings: Settings) -> tuple[np.ndarray | None, str, str]:
    """(reference pixels or None, its URI, a note when it is missing or unusable)."""
    if not reference_root:
        return None, "", ""
    uri = join(reference_root, key)
    fs, path = fsspec_for(uri, settings, shared=True)
    try:
        return decode_image(fs.cat_file(path)), uri, ""
    except FileNotFoundError:
        return None, "", "no reference"
    except ImageError as exc:
        return None, uri, f"reference unusable: {exc.reason}"


def _quality(noisy: np.ndarray, denoised: np.ndarray, reference: np.ndarray | None, note: str) -> tuple[dict, str]:
    from pipeline.metrics import estimate_noise_sigma, psnr, ssim

    x, y = to_float(noisy), to_float(denoised)
    scores: dict[str, float | None] = {"sigma_in": estimate_noise_sigma(x), "sigma_out": estimate_noise_sigma(y),
                                       "psnr_in": None, "psnr_out": None, "ssim_in": None, "ssim_out": None}
    if reference is not None:
        if reference.shape != noisy.shape:
            (rh, rw), (h, w) = reference.shape[:2], noisy.shape[:2]
            return scores, f"reference is {rw}x{rh}, image is {w}x{h}"
        r = to_float(reference)
        scores |= {"psnr_in": psnr(r, x), "psnr_out": psnr(r, y), "ssim_in": ssim(r, x), "ssim_out": ssim(r, y)}
    return scores, note


def finish_row(row: dict, *, settings: Settings, config: DenoiseConfig, model_ref: str, model_version: str,
               run_id: str, index: StateIndex = StateIndex()) -> dict:
    """Write the PNG, score it and record the item in the ledger; returns the item's status row.

    The key's earlier done records in this partition (``index``) go first: they describe the
    PNG about to be replaced.
    """
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    record = {"key": row["key"], "input_uri": row["input_uri"], "checksum": row["checksum"],
              "status": row["status"], "reason": row["reason"], "stage": row["stage"], "retry": bool(row["retry"]),
              "max_megapixels": config.max_megapixels, "max_image_mb": config.max_image_mb,
              "run_id": run_id, "finished_at": now, "partition": config.partition}
    fs, out_root = fsspec_for(config.output, settings, shared=True)
    item = item_name(row["key"], row["checksum"])
    preview = b""
    if record["status"] == "pending":
        try:
            forget_done(fs, out_root, partition=config.partition, names=index.records_of(row["key"]))
            result, preview = _write_result(row, fs, settings=settings, config=config, model_ref=model_ref,
                                            model_version=model_version)
            record |= result
            record_done(fs, out_root, partition=config.partition, item=item,
                        recipe=config.recipe_tag(model_ref, model_version), record=record)
        except Exception as exc:  # storage or metric failure: report it, retry next run
            record |= {"status": "failed", "stage": "write", "retry": True,
                       "reason": printable(f"write failed: {first_line(exc)}")}
    if record["status"] == "failed":
        final = not record["retry"] and bool(record["checksum"])
        try:
            record_error(fs, out_root, partition=config.partition, item=item, record=record,
                         limits=config.limits_tag if final else None)
        except Exception as exc:  # the row still reaches the driver's counts and log
            record["reason"] += f" (error record not written: {type(exc).__name__})"
    return status_row(record, preview)


def status_row(record: dict, preview: bytes = b"") -> dict:
    """One fixed schema for every item's row back to the driver (NaN where a score is missing)."""
    row = {c: record.get(c) for c in STATUS_COLUMNS}
    for column in FLOAT_COLUMNS:
        row[column] = float("nan") if row[column] is None else float(row[column])
    for column in ("height", "width", "bits"):
        row[column] = int(row[column] or 0)
    for column in ("output_uri", "reason", "note", "checksum", "node"):
        row[column] = row[column] or ""
    return {**row, "preview": preview}


def _write_result(row: dict, fs, *, settings: Settings, config: DenoiseConfig, model_ref: str,
                  model_version: str) -> tuple[dict, bytes]:
    h, w, bits = int(row["height"]), int(row["width"]), int(row["bits"])
    noisy, denoised = pixels_of(row["pixels"], h, w, bits), pixels_of(row["denoised"], h, w, bits)
    output_uri = join(config.out_root, "images", output_key(row["key"]))
    write_atomic(fs, strip_scheme(output_uri), encode_png(denoised))
    reference, reference_uri, note = _reference(config.reference, row["key"], settings)
    scores, note = _quality(noisy, denoised, reference, note)
    result = {"status": "done", "output_uri": output_uri, "height": h, "width": w, "bits": bits,
              "seconds": float(row["seconds"]), **scores, "reference_uri": reference_uri, "note": note,
              "node": str(row.get("node") or ""),
              "model_uri": model_ref, "model_version": model_version, "sampler": config.sampler,
              "steps": config.sampler_steps}
    return result, _preview(noisy, denoised, reference if scores["psnr_in"] is not None else None)


# -- the driver ----------------------------------------------------------------------


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0
    psnr_gain: list[float] = field(default_factory=list)
    ssim_gain: list[float] = field(default_factory=list)
    sigma_drop: list[float] = field(default_factory=list)
    previews: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    def add(self, row: dict, keep_previews: int) -> None:
        status = row["status"]
        if status == "skipped":
            self.skipped += 1
        elif status == "failed":
            self.failed += 1
        elif status == "done":
            self.done += 1
            self.megapixels += row["height"] * row["width"] / 1e6
            self.sigma_drop.append(row["sigma_in"] - row["sigma_out"])
            if not np.isnan(row["psnr_in"]):
                self.psnr_gain.append(row["psnr_out"] - row["psnr_in"])
                self.ssim_gain.append(row["ssim_out"] - row["ssim_in"])
            if len(self.previews) < keep_previews:
                self.previews.append((row["key"], row["preview"]))

    def line(self) -> str:
        return (f"{self.done} done, {self.skipped} skipped, {self.failed} failed, {self.megapixels:.2f} MP in "
                f"{self.seconds:.1f}s ({self.mp_per_s:.3f} MP/s)")

    def metrics(self) -> dict[str, float]:
        found = {"items_done": self.done, "items_skipped": self.skipped, "items_failed": self.failed,
                 "megapixels": self.megapixels, "seconds": self.seconds, "mp_per_s": self.mp_per_s}
        for name, values in (("psnr_gain", self.psnr_gain), ("ssim_gain", self.ssim_gain),
                             ("sigma_reduction", self.sigma_drop)):
            if values:
                found |= {f"mean_{name}": float(np.mean(values)), f"median_{name}": float(np.median(values))}
        return found


def ray_remote_args(config: DenoiseConfig) -> tuple[dict, dict]:
    """Resources and retry caps of (the read/decode and write/score tasks, the model actors).

    Ray Data retries a task forever and restarts actors forever by default, so one item that
    gets its worker killed for memory would loop all night; capped, its items become error
    rows (``unfinished_rows``) and the run goes on.
    """
    # The memory reservation bounds decoded images in flight per node, and, since the model
    # actors ask for none, keeps Ray Data from fusing reading and decoding into the actors.
    tasks = {"num_cpus": config.cpus_per_task, "memory": config.task_memory_mb * (1 << 20),
             "max_retries": config.task_retries}
    # SPREAD: one actor per node where the cluster allows, so a lost node takes as few of them as possible.
    actors = {"num_cpus": config.cpus_per_worker, "max_restarts": config.task_retries,
              "max_task_retries": config.task_retries, "scheduling_strategy": "SPREAD"}
    if config.gpus_per_worker:
        actors["num_gpus"] = config.gpus_per_worker
    return tasks, actors


def build_dataset(config: DenoiseConfig, settings: Settings, sources: list[Source], *, index: StateIndex,
                  model_ref: str, model_version: str, run_id: str):
    """The lazy Ray Data graph; iterating it runs the job and yields one small row per item."""
    import ray.data

    archive_prefixes = tuple(s.rel + "/" for s in sources if kind_of(s.rel) == "archive")
    items = ray.data.from_items([{"rel": s.rel, "uri": s.uri, "size": s.size} for s in sources],
                                override_num_blocks=max(1, min(len(sources), 256)))
    task_args, actor_args = ray_remote_args(config)
    with warnings.catch_warnings():
        # The retry caps and SPREAD have no named parameter in Ray 2.60, only the deprecated remote args.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        decoded = items.flat_map(expand_source, **task_args, fn_kwargs={
            "settings": settings, "limits": config.limits, "index": index, "max_pixels": config.max_pixels,
            "archive_prefixes": archive_prefixes})
        denoised = decoded.map_batches(
            Denoise, batch_size=1, batch_format="numpy", zero_copy_batch=False,
            fn_constructor_kwargs={"model_uri": model_ref, "settings": settings, "sampler": config.sampler,
                                   "steps": config.steps, "tile": config.tile, "overlap": config.overlap,
                                   "batch_size": config.batch_size, "self_ensemble": config.self_ensemble,
                                   "threads": math.ceil(config.cpus_per_worker)},
            compute=ray.data.ActorPoolStrategy(size=config.workers), **actor_args)
        finished = denoised.map(finish_row, **task_args, fn_kwargs={
            "settings": settings, "config": config, "model_ref": model_ref, "model_version": model_version,
            "run_id": run_id, "index": index})
    # This dataset's own context (a copy), so the process-wide defaults stay as they were.
    finished.context.enable_progress_bars = False
    finished.context.max_errored_blocks = -1  # a block whose task died after its retries: its items are reported
    # Every actor placed before the first read: reading must not fill the nodes the actors are waiting for.
    finished.context.wait_for_min_actors_s = config.actors_wait_s
    return finished


def unfinished_sources(sources: list[Source], keys_seen: set[str]) -> list[Source]:
    """Sources of which no item came back: their task or actor died more often than
    ``task_retries`` allows (a node lost, a worker killed for memory) and Ray Data dropped the block.

    An archive that lost only some members counts as finished; its missing members have no
    record, so the next run redoes them.
    """
    by_key = {_text(s.rel): s for s in sources}
    finished = set()
    for key in keys_seen:
        while key and key not in by_key:
            key = key.rsplit("/", 1)[0] if "/" in key else ""
        finished.add(key)
    return [source for key, source in by_key.items() if key not in finished]


def unfinished_rows(sources: list[Source], keys_seen: set[str], *, settings: Settings, config: DenoiseConfig,
                    run_id: str) -> list[dict]:
    """Error rows (and records, retried next run) for the :func:`unfinished_sources` of the last pass."""
    rows = []
    for source in unfinished_sources(sources, keys_seen):
        row = _row(_text(source.rel), source.uri, status="failed", stage="task", reason=(
            f"no result: its Ray task died {config.task_retries + 1} times in each of {config.passes} pass(es) "
            f"(worker killed for memory, or a node lost); retried next run"))
        row |= {"retry": True, "denoised": b"", "seconds": 0.0}
        rows.append(finish_row(row, settings=settings, config=config, model_ref="", model_version="",
                               run_id=run_id))
    return rows


def run_batch_denoise(config: DenoiseConfig, settings: Settings, *, log: Callable[[str], None] = print,
                      progress_every_s: float = 15.0) -> dict:
    """Run the whole job: list, take OUTPUT's lease, denoise, merge the ledger, log to MLflow.

    Returns the summary and paths; ``mlflow_run`` is empty when MLflow could not be written
    (a warning says so; the outputs are complete all the same).
    """
    from pipeline.cluster import init_ray, require_shared
    from pipeline.modelstore import load_denoiser

    # Tasks read INPUT and write OUTPUT, actors load the model: on a cluster none of them may be on this disk.
    require_shared(settings, INPUT=config.input, OUTPUT=config.output, REFERENCE=config.reference,
                   MODEL=config.model)
    sources = list_sources(config.input, settings)
    log(f"input: {len(sources)} files under {config.input} "
        f"({sum(kind_of(s.rel) == 'archive' for s in sources)} archives)")
    denoiser = load_denoiser(config.model, settings)
    if config.sampler != "direct" and config.steps > denoiser.T:
        raise DenoiseConfigError(f"--steps {config.steps} is more than the model's T={denoiser.T}")
    # Pin an alias to the version it points at now, so every actor loads the same weights.
    model_ref = f"models:/{denoiser.name}/{denoiser.version}" if denoiser.name else config.model
    model_version = str(denoiser.version) if denoiser.version else weights_version(denoiser.model)
    log(f"model: {config.model} -> {model_ref} ({model_version}, T={denoiser.T}), sampler {config.sampler}, "
        f"K={config.sampler_steps}" + (", self-ensemble x8" if config.self_ensemble else ""))
    started = time.time()
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    lease = RunLease(config.output, settings, run_id=run_id, ttl_s=config.lease_seconds,
                     info={"partition": config.partition, "input": config.input,
                           "ray_submission_id": ray_submission_id() or ""}).acquire(log=log)
    summary = Summary()
    with lease:
        start = last = time.perf_counter()
        todo, seen = sources, set()
        for attempt in range(1, config.passes + 1):
            # Read again before a later pass: members of a broken archive done meanwhile are skipped.
            index = read_state_index(config.output, settings, recipe=config.recipe_tag(model_ref, model_version),
                                     limits=config.limits_tag, partition=config.partition)
            dataset = build_dataset(config, settings, todo, index=index, model_ref=model_ref,
                                    model_version=model_version, run_id=run_id)
            seen = set()
            log(f"pass {attempt}: {len(todo)} input(s), {config.workers} model actor(s) (placed before any read)")
            try:
                for row in dataset.iter_rows():
                    lease.check()
                    seen.add(row["key"])
                    if attempt > 1 and row["status"] == "skipped":
                        continue  # counted by the pass that did it
                    summary.add(row, keep_previews=config.samples)
                    if row["status"] == "failed":
                        log(f"failed: {row['key']}: {row['reason']}")
                    if time.perf_counter() - last > progress_every_s:
                        last = time.perf_counter()
                        summary.seconds = last - start
                        log(f"progress: {summary.line()}")
            except PipelineError:
                raise
            except Exception as exc:
                raise RunFailed(f"the Ray Data run failed ({first_line(exc)}); the {summary.done} items done are "
                                f"recorded, run again to finish the rest") from None
            lost = unfinished_sources(todo, seen)
            if not lost or attempt == config.passes:
                break
            log(f"{len(lost)} input(s) came back from no task (a node lost, or a worker killed for memory): "
                f"pass {attempt + 1}/{config.passes} over them")
            todo = lost
        for row in unfinished_rows(todo, seen, settings=settings, config=config, run_id=run_id):
            summary.add(row, keep_previews=0)
            log(f"failed: {row['key']}: {row['reason']}")
        summary.seconds = time.perf_counter() - start
        lease.confirm()  # a compare-and-swap now: the renewal thread may be behind
        manifest, errors = merge_state(output=config.output, out_root=config.out_root, partition=config.partition,
                                       settings=settings, run_id=run_id, log=log)
    log(f"summary: {summary.line()}")
    tags = {"input": config.input, "output": config.out_root, "model_uri": model_ref,
            "model_name": denoiser.name or "", "model_version": model_version,
            "ray_submission_id": ray_submission_id() or "", "batch_run_id": run_id}
    run_url = log_run(config, settings, summary=summary, manifest=manifest, errors=errors, tags=tags,
                      started=started, log=log)
    return {"summary": summary, "manifest": join(config.out_root, "manifest.parquet"),
            "errors": join(config.out_root, "errors.parquet"), "mlflow_run": run_url,
            "manifest_rows": len(manifest), "error_rows": len(errors)}


def log_run(config: DenoiseConfig, settings: Settings, *, summary: Summary, manifest, errors, tags: dict,
            started: float, log: Callable[[str], None] = print) -> str:
    """The run's MLflow record, written after the merge; its URL, or "" (and a warning) if MLflow fails.

    The images and the manifest are the product: MLflow being down at this point must not
    turn a complete run into a failed one.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    date = config.date or dt.datetime.fromtimestamp(started, dt.timezone.utc).date().isoformat()
    client = mlflow.MlflowClient(settings.mlflow_uri)
    try:
        experiment_id = ensure_experiment(client, config.experiment)
        run = client.create_run(experiment_id, start_time=int(started * 1000),
                                tags={**source_tags("jobs/denoise.py"), **tags},
                                run_name=f"batch-denoise-{date}")
        run_id, now = run.info.run_id, int(time.time() * 1000)
        params = {k: v for k, v in config.model_dump().items() if k not in ("input", "output")}
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.metrics().items()],
                         params=[Param(k, str(v)) for k, v in params.items()])
        for name, table in (("manifest.json", manifest), ("errors.json", errors)):
            if len(table):
                client.log_table(run_id, table, artifact_file=name)
        for i, (key, png) in enumerate(summary.previews):
            client.log_image(run_id, decode_image(png), artifact_file=f"samples/{i}-{output_key(key).replace('/', '_')}")
        client.set_terminated(run_id, "FINISHED")
    except Exception as exc:
        log(f"warning: outputs and manifest are complete, but the MLflow run could not be logged to "
            f"{settings.mlflow_uri} ({first_line(exc)})")
        return ""
    return ui_url(settings.mlflow_uri, experiment_id, run_id)
