"""Object storage going away mid-run: a private SeaweedFS (its own ports, data dir and keys, started
with infra/local/stack.py) is SIGKILLed while a job runs and started again on the same data. The
job either rides it out, or fails with a clear error and a rerun finishes with nothing lost or
done twice. The shared stack's S3 is never touched; its Ray and MLflow run the jobs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.checkpoint import checkpoint_files
from pipeline.demo_data import demo_pairs
from pipeline.images import encode_png
from pipeline.model import build_model
from pipeline.settings import load_settings
from pipeline.shards import write_json, write_split
from pipeline.train import stored_checkpoint
from pipeline.storage import arrow_fs_for, fsspec_for, join, write_atomic
from tests.conftest import ROOT, STACK, STACK_ENV, read_env_file
from tests.test_denoise_job import SMALL, images_under, noisy_photo, read_table, summary_counts
from tests.test_stack import NAMES, free_ports
from tests.test_train_job import write_config

pytestmark = pytest.mark.stack

OUTAGE_S = 3.0        # how long S3 stays down before it is started again


class PrivateS3:
    """A SeaweedFS of its own under ``root``: same `weed mini` flags as the stack's, other ports."""

    def __init__(self, root: Path):
        ports = dict(zip(NAMES, free_ports(len(NAMES))))
        self.local = root / "local"
        self.env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "DENOISE_LOCAL_DIR": str(self.local)}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            self.env.pop(key, None)     # its own keys, generated into its local dir

    def start(self) -> None:
        proc = subprocess.run([*STACK, "up", "seaweedfs"], env=self.env, capture_output=True, text=True,
                              timeout=180, cwd=ROOT)
        assert proc.returncode == 0 and "seaweedfs" in proc.stdout, proc.stdout + proc.stderr

    def kill(self) -> None:
        """SIGKILL every process of weed's session: no clean shutdown, no flush."""
        pidfile = self.local / "run" / "seaweedfs.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
            pidfile.unlink()

    def client_env(self) -> dict[str, str]:
        """The shared stack's Ray and MLflow, this store's S3 endpoint and keys."""
        own = read_env_file(self.local / "stack.env")
        storage = {k: own[k] for k in ("DENOISE_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                        "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "DENOISE_BUCKET")}
        return {**STACK_ENV, **storage, "AWS_ENDPOINT_URL": own["DENOISE_S3_ENDPOINT"]}


@pytest.fixture
def private_s3(tmp_path, stack_env):
    store = PrivateS3(tmp_path)
    store.start()
    yield store
    store.kill()


def start_job(script: str, *args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def run_again(script: str, *args: str, env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def wait_until(condition, *, job: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended before {what}"
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout:.0f}s")


def outage_while(job: subprocess.Popen, store: PrivateS3, log: Path, timeout: int = 400) -> tuple[int, str]:
    """Kill S3, keep it down OUTAGE_S, start it again; then the job's exit status and output."""
    store.kill()
    assert job.poll() is None, "the job ended before S3 went away: nothing was tested"
    time.sleep(OUTAGE_S)
    store.start()
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return job.returncode, log.read_text()


def assert_clear_failure(output: str) -> None:
    """A failed job says why in one `error:` line (what broke), not only a traceback."""
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert lines, output[-3000:]


def test_seaweedfs_killed_mid_denoise_loses_and_doubles_nothing(tmp_path, private_s3):
    env = private_s3.client_env()
    settings = load_settings(environ=env)
    prefix = settings.uri("faults", uuid.uuid4().hex[:8])
    checkpoint, source, output = join(prefix, "checkpoint"), join(prefix, "in"), join(prefix, "out")
    fs, _ = fsspec_for(prefix, settings)
    for name, data in checkpoint_files(build_model("tiny"), T=50).items():
        write_atomic(fs, fsspec_for(join(checkpoint, name), settings)[1], data)
    keys = [f"{i:02d}.png" for i in range(6)]
    for i, key in enumerate(keys):
        write_atomic(fs, fsspec_for(join(source, key), settings)[1], encode_png(noisy_photo(96, 40 + i)))
    args = [source, output, "--model", checkpoint, "--steps", "20", "--date", "2024-06-01", "--experiment",
            "tests-faults", "--lease-seconds", "20", *SMALL]

    log = tmp_path / "denoise.log"
    job = start_job("denoise.py", *args, env=env, log=log)
    done = fsspec_for(join(output, "_state", "done"), settings)[1]

    def some_done() -> bool:
        fs.invalidate_cache()
        return fs.exists(done) and bool(fs.find(done))

    wait_until(some_done, job=job, timeout=300, what="a finished item")
    status, out = outage_while(job, private_s3, log)
    if status != 0:
        assert_clear_failure(out)
        time.sleep(21)                           # a lease the failed run could not release goes stale
        redo = None                              # unknown: whatever it had not recorded
    else:
        first_done, skipped, redo = summary_counts(out)
        assert first_done + redo == len(keys) and skipped == 0, out[-3000:]
        # an item whose write failed says so on its own line; nothing about it was recorded
        assert len(re.findall(r"^failed: \d+\.png: .*EndpointConnectionError", out, flags=re.M)) == redo, out[-3000:]
    if status != 0 or redo:                      # a rerun does what is missing, and only that
        rerun = run_again("denoise.py", *args, env=env)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        done_now, skipped, failed = summary_counts(rerun.stdout)
        assert failed == 0 and done_now + skipped == len(keys) and skipped > 0
        assert redo is None or 1 <= done_now <= redo     # never more than what the first run missed
    day = join(output, "2024-06-01")
    manifest = read_table(settings, join(day, "manifest.parquet"))
    assert sorted(manifest["key"]) == keys and manifest["key"].is_unique and (manifest["status"] == "done").all()
    assert images_under(settings, join(day, "images")) == keys
    assert read_table(settings, join(day, "errors.parquet")).empty


@pytest.fixture
def private_dataset(private_s3):
    """Four train and two val pairs of 64 px demo photos in the private store."""
    settings = load_settings(environ=private_s3.client_env())
    uri = settings.uri("faults", f"train-data-{uuid.uuid4().hex[:8]}")
    pairs = demo_pairs(variants=1, size=64, names=("astronaut", "chelsea", "coffee", "rocket", "camera", "coins"))
    rows = {"train": [], "val": []}
    for i, (key, clean, noisy) in enumerate(pairs):
        split = "val" if i >= 4 else "train"
        rows[split].append({"key": key, "split": split, "clean": encode_png(clean), "noisy": encode_png(noisy),
                            "height": clean.shape[0], "width": clean.shape[1]})
    for split, split_rows in rows.items():
        write_split(split_rows, uri, split, settings)
    write_json(uri, "dataset.json", {"counts": {"train": 4, "val": 2}, "dataset_hash": "faults-" + uri[-8:]}, settings)
    return uri


def test_seaweedfs_killed_mid_training_resumes_from_the_last_checkpoint(tmp_path, private_s3, private_dataset):
    import mlflow

    env = private_s3.client_env()
    settings = load_settings(environ=env)
    storage = settings.uri("faults", f"checkpoints-{uuid.uuid4().hex[:8]}")
    config = write_config(tmp_path, private_dataset, storage, data={"patch_size": 32, "crops_per_image": 16},
                          train={"steps": 12, "log_every": 2}, checkpoint={"every_steps": 4},
                          validation={"every_steps": 4}, scaling={"num_workers": 1, "max_failures": 1})
    name = "faulty"
    log = tmp_path / "train.log"
    job = start_job("train.py", "--config", str(config), "--name", name, env=env, log=log)
    fs, run_dir = fsspec_for(join(storage, name), settings)
    arrow_fs, _ = arrow_fs_for(join(storage, name), settings)

    def checkpointed() -> bool:     # whole: a folder caught mid-upload is rightly not resumed from
        return stored_checkpoint(arrow_fs, run_dir) is not None

    try:
        wait_until(checkpointed, job=job, timeout=300, what="a complete checkpoint")
        status, out = outage_while(job, private_s3, log)
        if status != 0:
            assert_clear_failure(out)
            rerun = run_again("train.py", "--config", str(config), "--name", name, env=env)
            out = rerun.stdout + rerun.stderr
            assert rerun.returncode == 0, out[-4000:]
            resumed = re.search(r"resumed from checkpoint at step (\d+)/12", out)
            assert resumed and int(resumed.group(1)) >= 4, out[-4000:]      # not from step 0
        assert "step 12/12" in out, out[-4000:]
        fs.invalidate_cache()
        steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_dir) if p.rsplit("/", 1)[-1].startswith("step-"))
        assert steps[-1] == "step-00000012", steps
    finally:
        registered = yaml.safe_load(config.read_text())["mlflow"]["registered_model"]
        client = mlflow.MlflowClient(STACK_ENV["MLFLOW_TRACKING_URI"])
        try:
            client.delete_registered_model(registered)
        except Exception:  # never registered (the run failed before it got there)
            pass
