"""User-facing failures: one line that names what failed and how to fix it."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class PipelineError(Exception):
    """An error whose message is meant for the person running the job, not a traceback."""


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
