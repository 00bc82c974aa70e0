"""Which code made an artifact: the package version and, in a git checkout, the commit."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

PACKAGE = "denoise-pipeline"


def _git(*args: str) -> str | None:
    """``git ARGS`` in the checkout this package runs from; None outside git (e.g. a Ray job's working dir)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from; None outside git."""
    return _git("rev-parse", "HEAD")


def git_origin() -> dict:
    """``{"repo_url", "branch"}`` of the checkout, each None when unknown (no remote, detached HEAD).

    Credentials in an ``https://user:token@host/...`` remote are dropped: the URL goes into run records.
    """
    url = _git("config", "--get", "remote.origin.url")
    if url and "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://{rest.split('@', 1)[1]}"
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    return {"repo_url": url, "branch": branch if branch != "HEAD" else None}


def code_version() -> dict:
    """``{"package", "version", "git_commit"}`` for cards and run records."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": PACKAGE, "version": version, "git_commit": git_commit()}
