"""User-facing failures: one line that names what failed and how to fix it."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class PipelineError(Exception):
    """An error whose message is meant for the person running the job, not a traceback."""


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
    """Run a job's main; turn a PipelineError into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
