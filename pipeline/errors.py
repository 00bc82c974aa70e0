"""User-facing failures: one line that names what failed and how to fix it, and the job's exit status.

Every job exits with one of these, so a scheduler can tell a run worth retrying from one that
will fail the same way again (the table is in the README, "Exit codes").
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import traceback
from typing import Callable

EXIT_OK = 0
EXIT_BUG = 1            # an unexpected error: a bug, with its traceback
EXIT_PERMANENT = 2      # bad arguments, config or input: the same run fails the same way again
EXIT_TRANSIENT = 75     # EX_TEMPFAIL: a service was unreachable or timed out, or the lease was lost
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: ``ray job stop``, a pod's deletion, a scheduler's deadline


class PipelineError(Exception):
    """An error whose message is meant for the person running the job, not a traceback.

    Permanent unless ``transient=True`` (or a ``TransientError``): rerunning unchanged would
    fail the same way, so schedulers must not retry it.
    """

    transient = False

    def __init__(self, *args, transient: bool | None = None):
        super().__init__(*args)
        if transient is not None:
            self.transient = transient  # an instance attribute: kept when Ray pickles the error


class TransientError(PipelineError):
    """S3, MLflow or Ray did not answer, or answered "try later": the same run may well succeed later."""

    transient = True


def _network_errors() -> tuple[type, ...]:
    """Exception types that mean "could not reach the service", from the client libraries already loaded."""
    found: list[type] = [ConnectionError, TimeoutError]
    for module, names in (("socket", ("gaierror",)),
                          ("botocore.exceptions", ("HTTPClientError", "EndpointConnectionError")),
                          ("requests.exceptions", ("ConnectionError", "Timeout", "RetryError")),
                          ("urllib3.exceptions", ("MaxRetryError", "NewConnectionError", "ProtocolError",
                                                  "TimeoutError")),
                          ("aiohttp", ("ClientConnectionError", "ServerTimeoutError")),
                          ("ray.exceptions", ("GetTimeoutError",))):
        loaded = sys.modules.get(module)  # an error from a library means the library is loaded
        found += [getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name)]
    return tuple(t for t in found if isinstance(t, type))


_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
               "InternalError", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says a service was down, busy or too slow.

    A PipelineError decides for itself; otherwise the chain of causes is searched for a
    connection or timeout error, an HTTP 5xx/429, or a "slow down" code of S3 or MLflow.
    """
    network, seen = _network_errors(), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PipelineError):
            return exc.transient
        if isinstance(exc, network):
            return True
        if type(exc).__name__ == "URLError" and isinstance(getattr(exc, "reason", None), OSError):
            return True  # urllib: the reason is the socket error
        if isinstance(exc, OSError) and "NETWORK_CONNECTION" in str(exc):
            return True  # pyarrow's S3 client: "AWS Error NETWORK_CONNECTION ... Couldn't connect to server"
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or status == 429 or response.get("Error", {}).get("Code") in _BUSY_CODES:
                return True
        if getattr(exc, "error_code", None) in _BUSY_CODES:  # MlflowException
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def first_line(exc: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``: what a report row or a log line holds of an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def validation_problems(exc, *, where: str = "arguments", hints: dict[str, str] | None = None,
                        show_input: bool = True) -> str:
    """A pydantic ValidationError as ``key: problem; key: problem`` (one line, no URLs, no input dumps).

    ``hints`` adds text after a key (e.g. the environment variable that sets it); ``show_input=False``
    keeps the offending value out of the message (settings may hold secrets).
    """
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or where
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if show_input and err["type"] not in ("value_error", "model_type") \
                    and not isinstance(err.get("input"), dict):
                msg += f" (got {err['input']!r})"
        hint = (hints or {}).get(key, "")
        problems.append(f"{key}{hint}: {msg}")
    return "; ".join(problems)


def exit_on_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run a job's main and map how it ended to the exit status (the README's "Exit codes").

    A PipelineError is one ``error: ...`` line on stderr and 2, or 75 when it is transient;
    any other error is a bug (its traceback, then 1) unless it is a connection failure or
    timeout of S3, MLflow or Ray (traceback, ``error: ...``, 75). SIGTERM unwinds like an
    error, so ``finally`` blocks (a lease's release) run, and exits 143.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        with _sigterm_unwinds():
            try:
                return main(*args, **kwargs) or EXIT_OK
            except PipelineError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_TRANSIENT if exc.transient else EXIT_PERMANENT
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Exception as exc:
                if not is_transient(exc):
                    raise  # a bug: Python prints the traceback and exits 1
                traceback.print_exc()
                print(f"error: {first_line(exc)} (a service did not answer; run again later)", file=sys.stderr)
                return EXIT_TRANSIENT

    return wrapper


def _terminated(signum, frame):
    raise SystemExit(EXIT_TERMINATED)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers live there only


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a job runs, SIGTERM raises SystemExit(143) in the main thread; the previous handler after."""
    previous = signal.signal(signal.SIGTERM, _terminated) if _in_main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def keep_sigterm_handler():
    """Put the job's SIGTERM handler back after a library replaced it.

    ``ray.init`` installs its own (``sys.exit(15)``), which would turn a stopped job's 143 into 15.
    """
    handler = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None
    try:
        yield
    finally:
        if handler is _terminated:
            signal.signal(signal.SIGTERM, handler)
