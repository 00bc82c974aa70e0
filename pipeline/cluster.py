"""Connecting to Ray: the configured cluster, or a local one when no address is set."""

from __future__ import annotations

import logging
import os
import time

from pipeline.errors import PipelineError
from pipeline.settings import Settings

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def init_ray(settings: Settings, *, attempts: int = 3, **kwargs) -> None:
    """Join ``settings.ray_address`` (or start a local Ray) with the storage env for every worker."""
    import ray

    if ray.is_initialized():
        return
    _reload_ray_auth()
    # Keys stay out: runtime_env is shown by the dashboard and the State API. Tasks get them
    # inside the (pickled) settings; a cluster's pods get them from their own secret env.
    public = {k: v for k, v in settings.s3_env().items() if k not in SECRET_ENV}
    env_vars = {**public, "MLFLOW_TRACKING_URI": settings.mlflow_uri, "DENOISE_BUCKET": settings.bucket}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "DENOISE_SETTINGS", "MLFLOW_DISABLE_TELEMETRY"):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    runtime_env["env_vars"] = {**env_vars, **runtime_env.get("env_vars", {})}
    for attempt in range(attempts):
        try:
            ray.init(address=settings.ray_address, runtime_env=runtime_env, log_to_driver=True,
                     logging_level=logging.WARNING, **kwargs)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # A busy head can miss the connect deadline; a wrong address fails every attempt.
            if attempt + 1 < attempts and settings.ray_address:
                ray.shutdown()
                time.sleep(5 * (attempt + 1))
                continue
            where = settings.ray_address or "a new local cluster"
            raise PipelineError(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0]}; "
                                f"start the local stack with `make up` or set RAY_ADDRESS") from None


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
    if not local:
        return
    init_ray(settings)
    if not tasks_share_this_disk():
        name, uri = next(iter(local.items()))
        raise PipelineError(f"{name} {uri} is a path on this machine, which the cluster's other nodes cannot "
                            f"read or write: use an s3:// URI (or run without RAY_ADDRESS, on a local Ray)")
