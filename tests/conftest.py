"""Shared fixtures. Tests marked ``stack`` run against the real local stack, which the
``stack`` fixture starts (and stops again at the end if it started it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STACK = [sys.executable, str(ROOT / "infra" / "local" / "stack.py")]
# The stack's client environment, once the session has it. Jobs get it on top of os.environ, so an
# in-process library call that rewrites a variable (mlflow.set_tracking_uri does) cannot leak into them.
STACK_ENV: dict[str, str] = {}


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    return env


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    """Environment of the running local stack (started here when needed)."""
    was_up = subprocess.run([*STACK, "status"], capture_output=True).returncode == 0
    if not was_up:
        proc = subprocess.run([*STACK, "up"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"local stack did not start:\n{proc.stdout}\n{proc.stderr}")
    env = read_env_file(ROOT / ".local" / "stack.env")
    STACK_ENV.update(env)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if not was_up and not os.environ.get("DENOISE_KEEP_STACK"):
        subprocess.run([*STACK, "down"], capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def settings(stack_env):
    from pipeline.settings import load_settings

    return load_settings(environ=stack_env)


@pytest.fixture
def s3_prefix(settings) -> str:
    """A fresh ``s3://bucket/tests/<id>`` prefix for one test."""
    return settings.uri("tests", uuid.uuid4().hex[:12])


@pytest.fixture(scope="session")
def ray_cluster(settings):
    """This process joined to the stack's Ray cluster."""
    import ray

    from pipeline.cluster import init_ray

    init_ray(settings)
    yield ray
    ray.shutdown()


def run_job(script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """Run a job as a user would (a subprocess) and return the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          env={**os.environ, **STACK_ENV, **(env or {})}, timeout=timeout, cwd=ROOT)
