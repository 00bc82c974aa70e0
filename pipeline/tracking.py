"""MLflow at the edge: reachability checks and runs that survive restarts."""

from __future__ import annotations

import urllib.error
import urllib.request

from pipeline.errors import PipelineError


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
