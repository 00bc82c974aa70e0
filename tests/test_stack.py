"""The local stack: a taken port stops everything a start-up call started; late joiners get in;
keys, token and logs are readable by their owner only."""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, STACK, read_env_file

NAMES = ["DENOISE_S3_PORT", "DENOISE_WEED_MASTER_PORT", "DENOISE_WEED_VOLUME_PORT", "DENOISE_WEED_FILER_PORT",
         "DENOISE_WEED_ICEBERG_PORT", "DENOISE_WEED_LANCE_PORT", "DENOISE_WEED_ADMIN_PORT", "DENOISE_MLFLOW_PORT",
         "DENOISE_RAY_PORT", "DENOISE_RAY_DASHBOARD_PORT", "DENOISE_RAY_CLIENT_PORT"]


def free_ports(n: int) -> list[int]:
    """Ports free now, and free at +10000 too (SeaweedFS's gRPC listeners)."""
    found, sockets = [], []
    for base in range(21000, 40000, 7):
        try:
            for p in (base, base + 10000):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                sockets.append(s)
        except OSError:
            continue
        found.append(base)
        if len(found) == n:
            break
    for s in sockets:
        s.close()
    return found


@pytest.mark.stack
def test_port_in_use_leaves_nothing_half_started(tmp_path):
    ports = dict(zip(NAMES, free_ports(len(NAMES))))
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "DENOISE_LOCAL_DIR": str(tmp_path / "local")}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    with socket.socket() as squatter:   # something else holds MLflow's port
        squatter.bind(("127.0.0.1", ports["DENOISE_MLFLOW_PORT"]))
        squatter.listen()
        proc = subprocess.run([*STACK, "up"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert f"port {ports['DENOISE_MLFLOW_PORT']} is already in use" in proc.stderr
    assert "seaweedfs: healthy" in proc.stdout          # it did start, and was then stopped again
    with socket.socket() as probe:                     # SeaweedFS's S3 port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", ports["DENOISE_S3_PORT"]))
    assert not (tmp_path / "local" / "run" / "seaweedfs.pid").exists()
    # keys were generated once into the local dir, never printed
    creds = (tmp_path / "local" / "s3-credentials.json").read_text()
    assert oct((tmp_path / "local" / "s3-credentials.json").stat().st_mode)[-3:] == "600"
    assert creds.split('"')[7] not in proc.stdout + proc.stderr


def test_status_and_help_run_without_a_stack(tmp_path):
    env = {**os.environ, "DENOISE_LOCAL_DIR": str(tmp_path / "local"), "DENOISE_S3_PORT": "1",
           "DENOISE_MLFLOW_PORT": "2", "DENOISE_RAY_DASHBOARD_PORT": "3"}
    proc = subprocess.run([*STACK, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "stopped" in proc.stdout and "MLflow UI" in proc.stdout
    proc = subprocess.run([*STACK, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "up|down|status" in proc.stdout


JOIN_LATE = """
import os, sys
auth = {k: os.environ.pop(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
from ray._raylet import get_authentication_mode
get_authentication_mode()  # Ray caches "no auth" here, before the process knows the stack
os.environ.update(auth)
from pipeline.cluster import init_ray
from pipeline.settings import load_settings
import ray
init_ray(load_settings(), attempts=1)
print("cpus", ray.cluster_resources()["CPU"])
"""


@pytest.mark.stack
def test_a_process_that_learns_the_token_late_still_joins(stack_env):
    """Tests (and notebooks) set the stack's env after Ray was first touched; joining must still work."""
    proc = subprocess.run([sys.executable, "-c", JOIN_LATE], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **stack_env}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("cpus "), proc.stdout


def load_stack(local: Path | None = None):
    """infra/local/stack.py as a module; ``local`` replaces .local/ (read once, at import)."""
    saved = os.environ.get("DENOISE_LOCAL_DIR")
    if local is not None:
        os.environ["DENOISE_LOCAL_DIR"] = str(local)
    try:
        spec = importlib.util.spec_from_file_location("local_stack", ROOT / "infra" / "local" / "stack.py")
        stack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = stack
        spec.loader.exec_module(stack)
    finally:
        if local is not None:
            if saved is None:
                os.environ.pop("DENOISE_LOCAL_DIR")
            else:
                os.environ["DENOISE_LOCAL_DIR"] = saved
    return stack


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_owner_only_from_creation_whatever_the_umask(tmp_path):
    """Keys, token and env file are 0600 and their directories 0700 even under umask 000."""
    stack = load_stack(tmp_path / "local")
    old_umask = os.umask(0)
    try:
        secret = stack.write_secret(tmp_path / "local" / "ray" / "auth_token", "t0ken")
        assert mode(secret) == 0o600 and secret.read_text() == "t0ken"
        assert mode(tmp_path / "local") == 0o700 and mode(tmp_path / "local" / "ray") == 0o700
        stack.write_secret(secret, "rotated")                    # replacing keeps it private and whole
        assert mode(secret) == 0o600 and secret.read_text() == "rotated"
        assert [p.name for p in secret.parent.iterdir()] == ["auth_token"]    # no temporary left behind
        old = tmp_path / "local" / "logs"                        # what an older version left: 755 / 644
        old.mkdir(mode=0o755)
        (old / "ray.log").write_text("earlier\n")
        (old / "ray.log").chmod(0o644)
        with stack.private_log(old / "ray.log") as out:
            out.write(b"later\n")
        assert mode(old) == 0o700 and mode(old / "ray.log") == 0o600
        assert (old / "ray.log").read_text() == "earlier\nlater\n"
        with stack.private_log(old / "mlflow.log"):
            pass
        assert mode(old / "mlflow.log") == 0o600
        (old / "seaweedfs.log").write_text("")                   # a running service's log, not reopened
        (old / "seaweedfs.log").chmod(0o644)
        (tmp_path / "local" / "mlflow").mkdir(mode=0o755)
        stack.narrow_local()                                     # what `up` does first
        assert mode(old / "seaweedfs.log") == 0o600 and mode(tmp_path / "local" / "mlflow") == 0o700
    finally:
        os.umask(old_umask)


def test_env_prints_no_secret_unless_asked(tmp_path):
    env = {**os.environ, "DENOISE_LOCAL_DIR": str(tmp_path / "local")}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    shown = subprocess.run([*STACK, "env"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    written = read_env_file(tmp_path / "local" / "stack.env")      # clients still get everything
    secret = written["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 30 and secret not in shown.stdout + shown.stderr
    assert mode(tmp_path / "local" / "stack.env") == 0o600
    assert "AWS_SECRET_ACCESS_KEY" in shown.stdout and f"export AWS_ACCESS_KEY_ID={written['AWS_ACCESS_KEY_ID']}" \
        in shown.stdout
    asked = subprocess.run([*STACK, "env", "--show-secrets"], env=env, capture_output=True, text=True, timeout=60)
    assert f"export AWS_SECRET_ACCESS_KEY={secret}\n" in asked.stdout
    assert read_env_file(tmp_path / "local" / "stack.env") == written


@pytest.mark.stack
def test_running_stack_keeps_local_private(stack_env):
    """What `up` left in .local/: no directory others can enter, no secret or log others can read."""
    local = ROOT / ".local"
    open_to_others = [f"{oct(mode(p))} {p.relative_to(ROOT)}" for p in [local, *local.iterdir()]
                      if (p.is_dir() and mode(p) != 0o700) or (p.is_file() and mode(p) & 0o077)]
    open_to_others += [f"{oct(mode(p))} {p.relative_to(ROOT)}"
                       for p in [local / "ray" / "auth_token", local / "stack.env", *(local / "logs").iterdir()]
                       if mode(p) != 0o600]
    assert open_to_others == []


def test_stopping_a_session_ends_its_processes_and_no_others():
    """`make down` ends only the Ray head's session; another cluster's processes must survive."""
    import time

    stack = load_stack()
    # a leader that leaves daemons behind and exits, as `ray start` does (one ignores SIGTERM), and a bystander
    leader = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & (trap '' TERM; exec sleep 60) & exit 0"],
                              start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        leader.wait(timeout=10)
        deadline = time.monotonic() + 10
        while len(stack.session_members(leader.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stack.session_members(leader.pid)) == 3
        stack.stop_session(leader.pid, grace=1)
        assert stack.session_members(leader.pid) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
