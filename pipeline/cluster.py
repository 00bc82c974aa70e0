"""Connecting to Ray: the configured cluster, or a local one when no address is set."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from pipeline.errors import PipelineError, TransientError, keep_sigterm_handler
from pipeline.settings import Settings

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
FORWARDED_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "DENOISE_SETTINGS", "MLFLOW_DISABLE_TELEMETRY")
VERBOSE_ENV = "DENOISE_VERBOSE"
# Workers' defaults; a value set in this process's environment wins.
RAY_DEFAULT_ENV = {
    # Ray Train's preemption watcher, an actor started with every worker group, reacts to nodes Ray
    # was asked to drain (here only idle ones are: the autoscaler's). Its creation logs a C++ error,
    # "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store
    # and max_restarts > 0" (ray-project/ray#53727), on every run. Without it a drained node's
    # workers count as a failure (scaling.max_failures) instead of a preemption.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# Ray's own console noise, kept out unless DENOISE_VERBOSE is set. (RAY_BACKEND_LOG_LEVEL is no way
# to quiet the C++ side: every worker process then logs that it read it, to every driver's console.)
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "WARNING",  # execution plans, and progress logged for a stdout that is no terminal
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # rank 0's "View run ... at" (the driver names the run)
}
# The job config that Ray's job supervisor hands a submitted driver; it holds the job's runtime_env.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def verbose() -> bool:
    """Whether DENOISE_VERBOSE asks for Ray's log lines as Ray prints them."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def worker_env(settings: Settings) -> dict[str, str]:
    """The env_vars of every worker: where the store and MLflow are, how loud Ray is; never a secret.

    Keys, tokens and passwords stay out, since runtime_env is shown by the dashboard and the State
    API: tasks get them inside the (pickled) settings (``Settings.apply_mlflow_env`` for MLflow),
    a cluster's pods from their own secret env.
    """
    env = {k: v for k, v in settings.s3_env().items() if k not in SECRET_ENV}
    env |= {"MLFLOW_TRACKING_URI": settings.mlflow_uri, "DENOISE_BUCKET": settings.bucket}
    env |= {name: os.environ[name] for name in (*FORWARDED_ENV, VERBOSE_ENV) if os.environ.get(name)}
    defaults = RAY_DEFAULT_ENV | ({} if verbose() else QUIET_ENV)
    return env | {name: os.environ.get(name) or value for name, value in defaults.items()}


def job_runtime_env(environ: dict[str, str] | None = None) -> dict:
    """The runtime_env of the submitted Ray job this driver runs in (``ray job submit --runtime-env-json``), or {}."""
    raw = (os.environ if environ is None else environ).get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def without_job_fields(runtime_env: dict, job: dict) -> tuple[dict, list[str]]:
    """``runtime_env`` minus the fields and env vars the job's own runtime_env sets, and the names that
    differed in value.

    Ray refuses a driver's runtime_env that shares a field or an env var with its job's, even an
    equal one ("Failed to merge the Job's runtime env"). The job's values stay: they are what the
    submitter asked for, and this process's environment (where the settings came from) has them.
    """
    fields = {k: v for k, v in runtime_env.items() if k != "env_vars"}
    env, job_env = runtime_env.get("env_vars") or {}, job.get("env_vars") or {}
    kept = {k: v for k, v in fields.items() if k not in job}
    kept_env = {k: v for k, v in env.items() if k not in job_env}
    differ = [k for k, v in fields.items() if k in job and job[k] != v]
    differ += [k for k, v in env.items() if k in job_env and str(job_env[k]) != str(v)]
    return kept | ({"env_vars": kept_env} if kept_env else {}), sorted(differ)


def init_ray(settings: Settings, *, attempts: int = 3, **kwargs) -> None:
    """Join ``settings.ray_address`` (or start a local Ray) with the storage env for every worker.

    Inside a submitted Ray job, what the job's runtime_env already sets is left to it. Unless
    DENOISE_VERBOSE is set, Ray's own noise is kept off the console (``QUIET_ENV``).
    """
    import ray

    if ray.is_initialized():
        return
    _reload_ray_auth()
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    runtime_env = {**runtime_env, "env_vars": {**worker_env(settings), **(runtime_env.get("env_vars") or {})}}
    runtime_env, differ = without_job_fields(runtime_env, job_runtime_env())
    if differ:
        print(f"warning: the Ray job's runtime_env sets {', '.join(differ)} differently; its values are used",
              file=sys.stderr)
    for attempt in range(attempts):
        try:
            with keep_sigterm_handler():  # a stopped job still exits 143
                ray.init(address=settings.ray_address, runtime_env=runtime_env, log_to_driver=True,
                         logging_level=logging.WARNING, **kwargs)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if "Failed to merge the Job's runtime env" in str(exc):  # its text holds both envs: not shown
                raise PipelineError("Ray refused to merge this driver's runtime_env with the Ray job's: both set "
                                    "the same field or environment variable") from None
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # A busy head can miss the connect deadline; a wrong address fails every attempt.
            if attempt + 1 < attempts and settings.ray_address:
                ray.shutdown()
                time.sleep(5 * (attempt + 1))
                continue
            where = settings.ray_address or "a new local cluster"
            raise TransientError(f"cannot connect to Ray at {where}: {message}; "
                                 f"start the local stack with `make up` or set RAY_ADDRESS") from None


def train_data_config():
    """Ray Train's DataConfig with the ingest options it uses by default, without ``exclude_resources``.

    Ray Train builds its default (``DataConfig.default_ingest_options``) by passing the DataContext's
    ``exclude_resources``, deprecated in Ray 2.60 for ``label_selector``, so every run's
    DatasetManager warned "`ExecutionOptions.exclude_resources` is deprecated". Nothing here
    excludes resources, so these are the same options without it.
    """
    import ray.data
    import ray.train

    options = ray.data.DataContext.get_current().execution_options
    return ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(
        resource_limits=options.resource_limits, preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress))


def _reload_ray_auth() -> None:
    """Make Ray read RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH again before connecting.

    Ray caches both per process the first time anything asks (an import, a Ray Data call, a
    local ``ray.init``); a process that learns the cluster's token path later would otherwise
    connect with a stale or missing token and be refused ("InvalidAuthToken").
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token auth: nothing cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def tasks_share_this_disk() -> bool:
    """Whether every node that can run a task or actor is this process's own node (a local Ray).

    On a cluster, a path on this machine's disk does not exist for tasks on other nodes;
    only S3, MLflow and Ray's object store cross between them.
    """
    import ray

    if not ray.is_initialized():  # the tasks will run in a Ray this process starts, on this machine
        return True
    here = ray.get_runtime_context().get_node_id()
    return all(node["NodeID"] == here for node in ray.nodes()
               if node["Alive"] and (node["Resources"].get("CPU") or node["Resources"].get("GPU")))


def require_shared(settings: Settings, **uris: str | None) -> None:
    """Refuse local paths that tasks on other nodes would have to read or write.

    Joins Ray only when a path is local, so jobs on S3 alone still fail fast without it.
    """
    local = {name: uri for name, uri in uris.items() if uri and "://" not in uri and not uri.startswith("models:")}
    if not local or not settings.ray_address:  # a Ray this process starts runs every task on this machine
        return
    init_ray(settings)
    if not tasks_share_this_disk():
        name, uri = next(iter(local.items()))
        raise PipelineError(f"{name} {uri} is a path on this machine, which the cluster's other nodes cannot "
                            f"read or write: use an s3:// URI (or run without RAY_ADDRESS, on a local Ray)")
