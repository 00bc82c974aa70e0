"""MLflow at the edge: reachability checks, the project's conventions for experiments, runs and
datasets, and training runs that survive restarts."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from pipeline.errors import PipelineError, first_line


class TrackingError(PipelineError):
    """The MLflow tracking server can't be used as configured."""


def check_mlflow(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with a fix, when the tracking server is not there."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({problem}); start the local "
                        f"stack with `make up` or set MLFLOW_TRACKING_URI", transient=not problem.startswith("HTTP 4"))


# ---------------------------------------------------------------- conventions

KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # MLflow's kind for model training (vs "genai_development")
# MLflow 3.17's UI opens an experiment in the view of its sidebar switch (GenAI unless the browser
# chose otherwise) whatever the kind tag says; this query parameter picks the view in a link.
UI_VIEW = "workflowType=machine_learning"
DIGEST_CHARS = 16  # MLflow stores at most 36; the jobs print dataset hashes to 16 too


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing.

    An existing experiment without a kind gets ours; a kind someone chose in the UI stays.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={KIND_TAG: MODEL_TRAINING})
        except MlflowException:  # created meanwhile by a job beside this one
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def ui_url(uri: str, experiment: str, run_id: str | None = None) -> str:
    """A link to an experiment (or one of its runs) that opens in the UI's model-training view."""
    page = f"#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "")
    return f"{uri.rstrip('/')}/{page}?{UI_VIEW}"


def source_tags(entrypoint: str) -> dict[str, str]:
    """MLflow's ``mlflow.source.*`` tags for a run the job script ``entrypoint`` started: its name,
    type JOB, and the git commit, repository URL and branch where known."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL,
                                          MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE)

    from pipeline.version import code_version, git_origin

    origin = git_origin()
    tags = {MLFLOW_SOURCE_NAME: entrypoint, MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB),
            MLFLOW_GIT_COMMIT: code_version()["git_commit"], MLFLOW_GIT_REPO_URL: origin["repo_url"],
            MLFLOW_GIT_BRANCH: origin["branch"]}
    return {k: v for k, v in tags.items() if v}


def mlflow_dataset(uri: str, *, split: str, digest: str | None):
    """One split of a paired dataset as an ``mlflow.data`` record for ``log_input``: named
    ``<folder>/<split>``, the split's folder as source, its content hash as digest (MLflow's own
    digest of the record when None), the shards' columns as schema."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    root = uri.rstrip("/")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a local folder matches two equal local sources
        source = resolve_dataset_source(f"{root}/{split}")
    return MetaDataset(source, name=f"{root.rsplit('/', 1)[-1]}/{split}",
                       digest=digest[:DIGEST_CHARS] if digest else None, schema=_shard_schema())


def _shard_schema():
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema

    from pipeline.shards import SCHEMA

    kinds = {pa.string(): DataType.string, pa.binary(): DataType.binary, pa.int32(): DataType.integer}
    return Schema([ColSpec(kinds[field.type], field.name) for field in SCHEMA])


def training_datasets(uri: str, card: dict) -> dict:
    """The run inputs of training on the dataset at ``uri``: context -> ``mlflow.data`` record."""
    digest = card.get("dataset_hash")
    return {"training": mlflow_dataset(uri, split="train", digest=digest),
            "validation": mlflow_dataset(uri, split="val", digest=digest)}


def _dataset_inputs(datasets: dict) -> list:
    """What ``mlflow.log_input`` sends, for runs written through a client (not the active run)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for context, dataset in datasets.items()]


# ---------------------------------------------------------------- training runs

RUN_TAG = "denoise.train_run"  # where the Ray Train run keeps its checkpoints: a rerun there resumes this run


def open_training_run(uri: str, *, experiment: str, run_name: str, location: str, params: dict,
                      tags: dict, datasets: dict | None = None,
                      entrypoint: str = "jobs/train.py") -> tuple[str, bool, list[str]]:
    """The MLflow run of the Ray Train run kept at ``location``: found again by tag, or created,
    with the source tags of ``entrypoint`` and ``datasets`` (context -> ``mlflow.data`` record) as inputs.

    Returns (run_id, resumed, changed) where ``changed`` names params whose value differs
    from what the run logged before (MLflow keeps the first value; the caller warns).
    """
    import mlflow
    from mlflow.entities import Param, RunTag

    client = mlflow.MlflowClient(uri)
    exp_id = ensure_experiment(client, experiment)
    tags = {**source_tags(entrypoint), **tags}
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{location}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run, resumed = found[0], True
    else:
        run, resumed = client.create_run(exp_id, run_name=run_name, tags={RUN_TAG: location, **tags}), False
    logged = run.data.params
    values = {k: str(v)[:6000] for k, v in params.items()}
    changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
    new = [Param(k, v) for k, v in values.items() if k not in logged]
    for start in range(0, len(new), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=new[start:start + 100])
    if resumed:
        client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if datasets:  # again on resume: MLflow keeps one input per dataset and run
        client.log_inputs(run.info.run_id, datasets=_dataset_inputs(datasets))
    return run.info.run_id, resumed, changed


class RunLogger:
    """Rank 0's MLflow logging: batched by step, never raising, counting what it could not send.

    Metrics are kept per (key, step) only above what the run already holds, so a worker
    group restarted from an older checkpoint does not log a step twice. After a failure,
    sends pause for ``retry_after`` seconds and the buffer is sent once MLflow answers again.
    """

    def __init__(self, uri: str, run_id: str, *, system_metrics: bool = True, retry_after: float = 20.0,
                 max_buffer: int = 20000):
        self.uri, self.run_id, self.system_metrics = uri, run_id, system_metrics
        self.retry_after, self.max_buffer = retry_after, max_buffer
        self.failures = self.dropped = 0
        self.first_error: str | None = None
        self._buffer: list = []
        self._watermarks: dict[str, int] | None = None
        self._paused_until = 0.0
        self._client = None
        self._keys: list[str] = []
        self._active = False

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.first_error = self.first_error or first_line(exc, limit=300)
        self._paused_until = time.monotonic() + self.retry_after

    def _ready(self) -> bool:
        return time.monotonic() >= self._paused_until

    def start(self, keys: list[str]) -> None:
        """Resume the run in this process (with system metrics) and learn which steps it holds."""
        import mlflow

        # Fail fast instead of MLflow's default minutes of retries with backoff: the buffer
        # is the retry, after ``retry_after`` seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._keys = keys
        self._client = mlflow.MlflowClient(self.uri)
        mlflow.set_tracking_uri(self.uri)
        if self.system_metrics and not _has_psutil():
            print("MLflow system metrics are off: the psutil package is not installed", flush=True)
            self.system_metrics = False
        try:
            mlflow.start_run(run_id=self.run_id, log_system_metrics=self.system_metrics)
            self._active = True
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            self._failed(exc)
        self._load_watermarks()

    def _load_watermarks(self) -> bool:
        if self._watermarks is not None:
            return True
        if not self._ready():
            return False
        try:
            self._watermarks = {key: max((m.step for m in self._client.get_metric_history(self.run_id, key)),
                                         default=-1) for key in self._keys}
            return True
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return False

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._buffer) > self.max_buffer:
            overflow = len(self._buffer) - self.max_buffer
            self.dropped += overflow
            del self._buffer[:overflow]

    def flush(self) -> None:
        if not self._buffer or not self._ready() or not self._load_watermarks():
            return
        fresh = [m for m in self._buffer if m.step > self._watermarks.get(m.key, -1)]
        try:
            for start in range(0, len(fresh), 1000):  # MLflow's batch limit
                self._client.log_batch(self.run_id, metrics=fresh[start:start + 1000])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        self._buffer.clear()

    def tags(self, tags: dict[str, str]) -> None:
        """Run tags (e.g. where this attempt's workers run); a failure is counted, never raised."""
        from mlflow.entities import RunTag

        try:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def image(self, image, key: str, step: int) -> None:
        """One picture per validation under ``key``."""
        if not self._ready():
            self.dropped += 1
            return
        try:
            self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            self.dropped += 1

    def close(self) -> None:
        """Last flush; leaves the run open for the driver, which logs the model and ends it."""
        import mlflow

        self._paused_until = 0.0
        self.flush()
        self.dropped += len(self._buffer)
        self._buffer.clear()
        if self._active:
            try:
                mlflow.end_run()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)

    def summary(self) -> str | None:
        """One line for the end of the job, or None when everything was sent."""
        if not self.failures and not self.dropped:
            return None
        return (f"MLflow logging failed {self.failures} time(s) on rank 0 ({self.first_error}); "
                f"{self.dropped} value(s) were not logged")


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True
