"""MLflow at the edge: reachability checks and runs that survive restarts."""

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
                        f"stack with `make up` or set MLFLOW_TRACKING_URI")


# ---------------------------------------------------------------- training runs

RUN_TAG = "denoise.train_run"  # where the Ray Train run keeps its checkpoints: a rerun there resumes this run


def open_training_run(uri: str, *, experiment: str, run_name: str, location: str, params: dict,
                      tags: dict) -> tuple[str, bool, list[str]]:
    """The MLflow run of the Ray Train run kept at ``location``: found again by tag, or created.

    Returns (run_id, resumed, changed) where ``changed`` names params whose value differs
    from what the run logged before (MLflow keeps the first value; the caller warns).
    """
    import mlflow
    from mlflow.entities import Param, RunTag

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
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
