"""Evaluation: the model's samplers against classic denoisers, on exactly the same pairs.

One work item is one (pair, method, K) cell and gives one result row. Classic methods run
as Ray Data tasks, the model in an actor pool (loaded once per actor); ``local=True`` runs
the same per-item function in this process. A cell that fails becomes a ``failed`` row
with its reason and the rest of the evaluation goes on.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.baselines import CLASSIC_METHODS, ORACLE_METHODS, available_methods, true_sigma
from pipeline.cluster import init_ray, require_shared
from pipeline.diffusion import SAMPLERS
from pipeline.errors import PipelineError, first_line, validation_problems
from pipeline.images import decode_png_float, encode_png, to_uint8
from pipeline.metrics import psnr, sidd_protocol, ssim
from pipeline.modelstore import DEFAULT_MODEL_URI, Denoiser, load_denoiser
from pipeline.pairs import dataset_hash
from pipeline.report import best_steps, headline, noise_fact, publish, staging_dir, summarize, write_report
from pipeline.settings import Settings
from pipeline.shards import DatasetError, center_crop, read_card, split_files
from pipeline.storage import arrow_fs_for
from pipeline.tracking import ensure_experiment, mlflow_dataset, source_tags, ui_url

TILE, OVERLAP = 512, 32
TASK_CPUS, ACTOR_CPUS, READ_CPUS = 0.5, 0.5, 0.25  # fractional: a 2-core cluster keeps room for reads
PREVIEW_PAIRS, PREVIEW_SIZE = 2, 128

RESULT_SCHEMA = pa.schema([
    ("key", pa.string()), ("method", pa.string()), ("sampler", pa.string()), ("steps", pa.int32()),
    ("psnr", pa.float64()), ("ssim", pa.float64()), ("seconds", pa.float64()), ("megapixels", pa.float64()),
    ("sec_per_mp", pa.float64()), ("status", pa.string()), ("reason", pa.string()),
])
ROW_SCHEMA = RESULT_SCHEMA.append(pa.field("preview", pa.binary()))  # what workers return


class EvaluationError(PipelineError):
    """Arguments or data that an evaluation cannot run on."""


class EvalConfig(BaseModel):
    """What to evaluate, validated once before any work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(description="paired dataset written by jobs/ingest.py (s3://... or a local folder)")
    model: str = Field(DEFAULT_MODEL_URI, description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint "
                                                      "folder")
    methods: tuple[str, ...] = Field(("noisy", "nl_means", "wavelet", "tv", "bm3d", "direct", "origin", "improved"),
                                     description="methods to run, comma-separated; bm3d is skipped when not "
                                                 "installed")
    steps: tuple[int, ...] = Field((1, 2, 5, 10), description="sampling steps K for the samplers, comma-separated, "
                                                              "clipped to the model's T")
    split: str = Field("val", description="dataset split")
    limit: int | None = Field(3, ge=1, description="evaluate the first N pairs by key; none for the whole split")
    every: int = Field(1, ge=1, description="take every N-th pair by key before --limit: a subset spread over "
                                            "all photos and levels of a large split")
    crop: int | None = Field(256, ge=8, description="centre crop side in pixels; none for full images")
    report: str = Field("reports/eval", description="report folder, local or s3://")
    experiment: str = Field("evaluation", description="MLflow experiment")
    local: bool = Field(False, description="run in this process without Ray (quick checks)")
    actors: int = Field(2, ge=1, description="model actors on Ray")
    gpu: bool = Field(False, description="one GPU per model actor")
    self_ensemble: bool = Field(False, description="average every model call of the samplers over the 8 flips "
                                                   "and quarter turns of the image (8x the model calls)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        known = (*CLASSIC_METHODS, *ORACLE_METHODS, *SAMPLERS)
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        if not methods:
            raise ValueError("no methods given")
        return tuple(dict.fromkeys(methods))

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, steps: tuple[int, ...]) -> tuple[int, ...]:
        if not steps or min(steps) < 1:
            raise ValueError(f"steps must be positive integers, got {list(steps)}")
        return tuple(sorted(set(steps)))

    @classmethod
    def of(cls, **values) -> "EvalConfig":
        try:
            return cls(**values)
        except ValidationError as exc:
            raise EvaluationError(validation_problems(exc)) from None

    @property
    def samplers(self) -> list[str]:
        return [m for m in self.methods if m in SAMPLERS]


# ---------------------------------------------------------------- one cell

def _preview(image: np.ndarray) -> bytes:
    return encode_png(to_uint8(center_crop(np.clip(image, 0, 1), PREVIEW_SIZE)))


def evaluate_item(item: dict, *, crop: int | None, sidd: bool, denoiser: Denoiser | None = None) -> dict:
    """Score one (pair, method, K) cell; any failure becomes a ``failed`` row with its reason."""
    method, steps = item["method"], item.get("steps")
    row = {"key": item["key"], "method": method, "sampler": method if method in SAMPLERS else None,
           "steps": steps, "psnr": None, "ssim": None, "seconds": None, "megapixels": None, "sec_per_mp": None,
           "status": "failed", "reason": None, "preview": None}
    try:
        clean, noisy = decode_png_float(item["clean"]), decode_png_float(item["noisy"])
        if clean.shape != noisy.shape:  # checked before cropping, which would hide it
            raise ValueError(f"clean {clean.shape[1]}x{clean.shape[0]} and noisy {noisy.shape[1]}x{noisy.shape[0]} "
                             f"differ in size")
        clean, noisy = center_crop(clean, crop), center_crop(noisy, crop)
        start = time.perf_counter()
        if method in SAMPLERS:
            if denoiser is None:
                raise RuntimeError("no model loaded for a model method")
            output = denoiser.denoise(noisy, sampler=method, steps=steps, tile=TILE, overlap=OVERLAP,
                                      self_ensemble=bool(item.get("self_ensemble")))
        elif method in ORACLE_METHODS:  # given what no real photo tells: its true noise level
            output = ORACLE_METHODS[method](noisy, true_sigma(clean, noisy))
        else:
            output = CLASSIC_METHODS[method](noisy)
        seconds = time.perf_counter() - start
        output = np.clip(output, 0.0, 1.0)
        scores = sidd_protocol(clean, output) if sidd else {"psnr": psnr(clean, output), "ssim": ssim(clean, output)}
        megapixels = clean.shape[0] * clean.shape[1] / 1e6
        row.update(psnr=scores["psnr"], ssim=scores["ssim"], seconds=seconds, megapixels=megapixels,
                   sec_per_mp=seconds / megapixels, status="ok",
                   preview=_preview(output) if item.get("preview") else None)
    except Exception as exc:  # noqa: BLE001 - one bad cell must not stop the evaluation
        row["reason"] = first_line(exc)
    return row


def method_steps(method: str, steps: Iterable[int]) -> list[int | None]:
    """The K values a method is run at: none for classic methods, 1 for direct (K-independent)."""
    return [None] if method not in SAMPLERS else [1] if method == "direct" else list(steps)


def work_items(pair: dict, *, methods: Iterable[str], steps: Iterable[int], preview_keys: Iterable[str],
               self_ensemble: bool = False) -> list[dict]:
    """The cells of one pair: one per classic method, one per (sampler, K)."""
    preview = pair["key"] in set(preview_keys)
    cells = []
    for method in methods:
        for k in method_steps(method, steps):
            cells.append({"key": pair["key"], "method": method, "steps": k, "clean": pair["clean"],
                          "noisy": pair["noisy"], "preview": preview,
                          "self_ensemble": self_ensemble and method in SAMPLERS})
    return cells


def _evaluate_batch(batch: pa.Table, *, crop, sidd, denoiser=None) -> pa.Table:
    rows = [evaluate_item(item, crop=crop, sidd=sidd, denoiser=denoiser) for item in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _place(denoiser: Denoiser, gpu: bool) -> Denoiser:
    import torch

    if gpu:
        if not torch.cuda.is_available():
            raise EvaluationError("--gpu was given but torch sees no CUDA device here")
        denoiser.model.to("cuda")
    return denoiser


class _ModelWorker:
    """Ray Data actor: holds the model (sent once, as the driver loaded it) and scores cells."""

    def __init__(self, denoiser: Denoiser, *, crop, sidd, gpu: bool):
        self.denoiser, self.crop, self.sidd = _place(denoiser, gpu), crop, sidd

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _evaluate_batch(batch, crop=self.crop, sidd=self.sidd, denoiser=self.denoiser)


# ---------------------------------------------------------------- which pairs

@dataclass(frozen=True)
class PairSelection:
    """The pairs an evaluation runs on: every ``every``-th key of one split, the first ``limit`` of them."""

    dataset: str
    split: str
    files: tuple[str, ...]
    keys: tuple[str, ...]
    total: int
    pairs_hash: str  # of exactly the evaluated pairs
    split_hash: str  # of the whole split

    @property
    def limited(self) -> bool:
        return len(self.keys) < self.total


def _null_count(parquet: pq.ParquetFile, column: str) -> int:
    """Nulls in one column from the row-group statistics; the column is read only if they are missing."""
    meta = parquet.metadata
    index = parquet.schema_arrow.get_field_index(column)
    stats = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
    if all(s is not None and s.has_null_count for s in stats):
        return sum(s.null_count for s in stats)
    return parquet.read(columns=[column]).column(column).null_count


def select_pairs(dataset: str, settings: Settings, *, split: str = "val", limit: int | None = None,
                 every: int = 1) -> PairSelection:
    """Check the split holds real pairs (from Parquet metadata, no image read) and pick the keys."""
    files = split_files(dataset, split, settings)
    fs, _ = arrow_fs_for(dataset, settings)
    hashes: dict[str, str] = {}
    for path in files:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            missing = [c for c in ("key", "clean", "noisy") if c not in names]
            if missing:
                raise DatasetError(f"{dataset} split '{split}' has no {'/'.join(missing)} column ({path}); "
                                   f"evaluation needs (clean, noisy) pairs")
            for side in ("clean", "noisy"):
                nulls = _null_count(parquet, side)
                if nulls:
                    raise DatasetError(f"{nulls} row(s) of {path} have no {side} image; evaluation needs "
                                       f"(clean, noisy) pairs, so ingest real pairs or let ingest synthesize "
                                       f"the noisy side")
            table = parquet.read(columns=[c for c in ("key", "pair_hash") if c in names])
        keys = table.column("key").to_pylist()
        pair_hashes = table.column("pair_hash").to_pylist() if "pair_hash" in names else [""] * len(keys)
        hashes.update(zip(keys, (h or "" for h in pair_hashes)))
    if not hashes:
        raise DatasetError(f"{dataset} split '{split}' has no pairs")
    keys = sorted(hashes)[::every][:limit]
    return PairSelection(dataset=dataset, split=split, files=tuple(files), keys=tuple(keys), total=len(hashes),
                         pairs_hash=dataset_hash({k: hashes[k] for k in keys}), split_hash=dataset_hash(hashes))


def read_selected_pairs(selection: PairSelection, settings: Settings,
                        keys: Iterable[str] | None = None) -> Iterator[dict]:
    """Encoded rows {key, clean, noisy} of the selected pairs, in this process."""
    wanted = list(selection.keys if keys is None else keys)
    fs, _ = arrow_fs_for(selection.dataset, settings)
    for path in selection.files:
        table = pq.read_table(path, filesystem=fs, columns=["key", "clean", "noisy"],
                              filters=[("key", "in", wanted)])
        yield from table.to_pylist()


# ---------------------------------------------------------------- running the cells

class Progress:
    """``method: done/total`` lines at every tenth of a method and when it is done."""

    def __init__(self, totals: dict[str, int], log: Callable[[str], None] = print):
        self.totals, self.done, self.failed, self.log = totals, dict.fromkeys(totals, 0), dict.fromkeys(totals, 0), log
        self.start = time.monotonic()

    def update(self, row: dict) -> None:
        method = row["method"]
        self.done[method] += 1
        self.failed[method] += row["status"] != "ok"
        done, total = self.done[method], self.totals[method]
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            failed = f", {self.failed[method]} failed" if self.failed[method] else ""
            self.log(f"  {method}: {done}/{total} cells{failed} ({time.monotonic() - self.start:.0f}s)")


def _run_local(selection, settings, *, config, steps, preview_keys, sidd, denoiser) -> Iterator[dict]:
    if denoiser is not None:
        _place(denoiser, config.gpu)
    for pair in read_selected_pairs(selection, settings):
        for item in work_items(pair, methods=config.methods, steps=steps, preview_keys=preview_keys,
                               self_ensemble=config.self_ensemble):
            yield evaluate_item(item, crop=config.crop, sidd=sidd, denoiser=denoiser)


def _run_on_ray(selection, settings, *, config, steps, preview_keys, sidd, denoiser) -> Iterator[dict]:
    """Classic cells as tasks, then model cells in an actor pool; results stream back as they finish."""
    import ray
    import ray.data

    fs, _ = arrow_fs_for(selection.dataset, settings)
    keys = set(selection.keys)

    def cells(methods):
        pairs = ray.data.read_parquet(list(selection.files), filesystem=fs, columns=["key", "clean", "noisy"],
                                      num_cpus=READ_CPUS)
        if selection.limited:
            pairs = pairs.filter(lambda row: row["key"] in keys, num_cpus=READ_CPUS)
        return pairs.flat_map(work_items, fn_kwargs={"methods": methods, "steps": steps, "preview_keys": preview_keys,
                                                     "self_ensemble": config.self_ensemble}, num_cpus=READ_CPUS)

    if config.gpu and config.samplers and not ray.cluster_resources().get("GPU"):
        raise EvaluationError("--gpu was given but the Ray cluster has no GPUs")
    scoring = {"crop": config.crop, "sidd": sidd}
    stages = []
    classic = [m for m in config.methods if m not in SAMPLERS]
    if classic:
        stages.append(cells(classic).map_batches(_evaluate_batch, batch_size=1, batch_format="pyarrow",
                                                 fn_kwargs=scoring, num_cpus=TASK_CPUS))
    if config.samplers:
        stages.append(cells(config.samplers).map_batches(
            _ModelWorker, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.actors),
            fn_constructor_kwargs={"denoiser": denoiser, "gpu": config.gpu, **scoring},
            num_cpus=ACTOR_CPUS, num_gpus=1 if config.gpu else 0))
    for stage in stages:  # one after the other: a union would hold results back until both end
        # One row per block: cells spread over workers and finish (and report) one by one. A
        # repartition would do the same but asks a whole CPU, which a busy 2-core cluster lacks.
        stage.context.target_max_block_size = 1
        for batch in stage.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()


def _log_to_mlflow(run_name: str, *, config: EvalConfig, settings: Settings, staging: Path, results: pa.Table,
                   summary: list[dict], tags: dict, params: dict, denoiser: Denoiser | None) -> tuple[str, str]:
    """The run (metrics, table, report files) and, for a registered model, its version's eval_run_id tag."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_uri)
    experiment = ensure_experiment(mlflow.MlflowClient(settings.mlflow_uri), config.experiment)
    metrics = {}
    for method, row in headline(summary).items():
        if not math.isnan(row["psnr"]):
            metrics.update({f"eval_psnr_{method}": row["psnr"], f"eval_ssim_{method}": row["ssim"],
                            f"eval_sec_per_mp_{method}": row["sec_per_mp"]})
    for row in summary:
        if row["method"] in SAMPLERS and not math.isnan(row["psnr"]):
            metrics[f"eval_psnr_{row['method']}_k{row['steps']}"] = row["psnr"]
    for name, row in best_steps(summary).items():
        metrics[f"eval_best_k_{name}"] = row["steps"]
    metrics["eval_failed_cells"] = sum(row["failed"] for row in summary)
    with mlflow.start_run(experiment_id=experiment, run_name=run_name,
                          tags={**source_tags("jobs/evaluate.py"), **tags}) as run:
        mlflow.log_input(mlflow_dataset(config.dataset, split=config.split, digest=tags["eval_pairs_hash"]),
                         context="evaluation")
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_table(results.to_pandas(), artifact_file="results.json")
        mlflow.log_artifacts(str(staging))
    if denoiser is not None and denoiser.name and denoiser.version:
        client = mlflow.MlflowClient(settings.mlflow_uri)
        client.set_model_version_tag(denoiser.name, denoiser.version, "eval_run_id", run.info.run_id)
    return run.info.run_id, run.info.experiment_id


def evaluate(config: EvalConfig, settings: Settings, *, log: Callable[[str], None] = print) -> dict:
    """Run the whole evaluation; returns {"report", "run_id", "summary", "results"}."""
    card = read_card(config.dataset, settings)
    selection = select_pairs(config.dataset, settings, split=config.split, limit=config.limit, every=config.every)
    sidd = card.get("layout") == "sidd-mat"
    methods, notes = available_methods(config.methods)
    if not methods:
        raise EvaluationError("nothing to evaluate: " + "; ".join(notes))
    config = config.model_copy(update={"methods": methods})

    denoiser, steps = None, list(config.steps)
    if config.samplers:
        denoiser = load_denoiser(config.model, settings)
        steps = sorted({min(k, denoiser.T) for k in config.steps})
        if steps != list(config.steps):
            notes.append(f"K clipped to the model's T = {denoiser.T}: {list(config.steps)} -> {steps}")
    for note in notes:
        log(f"note: {note}")

    preview_keys = list(selection.keys[:PREVIEW_PAIRS])
    totals = {m: len(selection.keys) * len(method_steps(m, steps)) for m in config.methods}
    if not config.local:  # only now: bad data or a bad model URI fail before any cluster work
        init_ray(settings)
        require_shared(settings, DATASET=config.dataset, MODEL=config.model)  # read by tasks and actors
    where = "in this process" if config.local else "on Ray"
    log(f"evaluating {len(selection.keys)} of {selection.total} pairs of {config.dataset} ({config.split}), "
        f"{sum(totals.values())} cells, {where}; protocol: {'SIDD 256x256 blocks' if sidd else 'whole image'}")
    run = _run_local if config.local else _run_on_ray
    progress, rows = Progress(totals, log), []
    for row in run(selection, settings, config=config, steps=steps, preview_keys=preview_keys, sidd=sidd,
                   denoiser=denoiser):
        progress.update(row)
        rows.append(row)
    order = {m: i for i, m in enumerate(config.methods)}
    rows.sort(key=lambda r: (r["key"], order[r["method"]], r["steps"] or 0))
    results = pa.Table.from_pylist(rows, schema=ROW_SCHEMA).drop_columns(["preview"])
    summary = summarize(rows, config.methods)
    failures = [r for r in rows if r["status"] != "ok"]

    facts = {
        "dataset": f"{config.dataset} (split `{config.split}`, layout `{card.get('layout', 'unknown')}`)",
        "pairs": f"{len(selection.keys)} of {selection.total} "
                 f"({'first' if config.every == 1 else f'every {config.every}th'} by key)",
        "crop": f"centre {config.crop}x{config.crop}" if config.crop else "none (full images)",
        "noise": noise_fact(card),
        "protocol": "SIDD: mean over 256x256 blocks" if sidd else "PSNR/SSIM on the whole image (data range 1)",
        "dataset hash": card.get("dataset_hash", selection.split_hash),
        "evaluated pairs hash": selection.pairs_hash,
        "model": (f"{config.model} (name {denoiser.name}, version {denoiser.version}, T = {denoiser.T})"
                  if denoiser else "not used"),
        "samplers": ("each model call averaged over the 8 flips and quarter turns of the image (self-ensemble)"
                     if config.self_ensemble else "one pass per image"),
        "timing": ("this process" if config.local else f"Ray workers ({TASK_CPUS} CPU per task, {ACTOR_CPUS} CPU per "
                   f"model actor{', GPU' if config.gpu else ''})") + "; compare speeds within one report only",
    }
    tags = {"dataset_uri": config.dataset, "dataset_hash": str(facts["dataset hash"]),
            "eval_pairs_hash": selection.pairs_hash, "split": config.split}
    if denoiser:
        tags.update({"model_uri": config.model, "model_name": denoiser.name or "",
                     "model_version": denoiser.version or ""})
    params = {"dataset": config.dataset, "split": config.split, "pairs": len(selection.keys), "crop": config.crop,
              "methods": ",".join(config.methods), "steps": ",".join(map(str, steps)), "model": config.model,
              "protocol": "sidd" if sidd else "whole", "local": config.local, "self_ensemble": config.self_ensemble}
    run_name = f"eval-{Path(config.dataset.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"

    staging = staging_dir(config.report)
    try:
        write_report(staging, rows=rows, results=results, summary=summary, facts=facts, notes=notes,
                      failures=failures, previews=_preview_pairs(selection, settings, preview_keys, config.crop),
                      plot_steps=bool(config.samplers))
        try:
            run_id, experiment_id = _log_to_mlflow(run_name, config=config, settings=settings, staging=staging,
                                                   results=results, summary=summary, tags=tags, params=params,
                                                   denoiser=denoiser)
            tracking_problem = None
        except Exception as exc:  # noqa: BLE001 - the report is still worth keeping
            run_id, tracking_problem = None, first_line(exc)
        with open(staging / "summary.md", "a") as handle:
            handle.write(f"\nMLflow run: {ui_url(settings.mlflow_uri, experiment_id, run_id)}\n"
                         if run_id else f"\nMLflow logging failed: {tracking_problem}\n")
        publish(staging, config.report, settings)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if tracking_problem:
        raise EvaluationError(f"report written to {config.report}, but logging to MLflow at {settings.mlflow_uri} "
                              f"failed: {tracking_problem}")
    log(f"report: {config.report} ({len(rows)} cells, {len(failures)} failed); MLflow run {run_id}")
    return {"report": config.report, "run_id": run_id, "summary": summary, "results": results}


def _preview_pairs(selection: PairSelection, settings: Settings, keys: list[str], crop: int | None) -> list[dict]:
    """Reference and noisy crops of the example pairs, cut like the methods' previews."""
    def cut(png: bytes) -> np.ndarray:
        return center_crop(center_crop(decode_png_float(png), crop), PREVIEW_SIZE)

    pairs = sorted(read_selected_pairs(selection, settings, keys), key=lambda p: p["key"])
    return [{"key": p["key"], "clean": cut(p["clean"]), "noisy": cut(p["noisy"])} for p in pairs]
