"""Which code made an artifact: the package version and, in a git checkout, the commit."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

PACKAGE = "denoise-pipeline"


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from; None outside git (e.g. a Ray job's working dir)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def code_version() -> dict:
    """``{"package", "version", "git_commit"}`` for cards and run records."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": PACKAGE, "version": version, "git_commit": git_commit()}
