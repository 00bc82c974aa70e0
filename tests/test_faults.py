"""Object storage going away mid-run: a private SeaweedFS (its own ports, data dir and keys, started
with infra/local/stack.py) is SIGKILLed while a job runs and started again on the same data. Each
test arranges one outcome for sure: the job rides the outage out, or it fails with a clear error and
a rerun finishes; either way nothing is lost or done twice. The shared stack's S3 is never touched;
its Ray and MLflow run the jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.checkpoint import checkpoint_files
from pipeline.demo_data import demo_pairs
from pipeline.errors import EXIT_TRANSIENT
from pipeline.images import encode_png
from pipeline.model import build_model
from pipeline.settings import Settings, load_settings
from pipeline.shards import write_json, write_split
from pipeline.storage import arrow_fs_for, fsspec_for, join, write_atomic
from pipeline.train import stored_checkpoint
from tests.conftest import ROOT, STACK, STACK_ENV, read_env_file
from tests.test_denoise_job import SMALL, images_under, noisy_photo, read_table, summary_counts
from tests.test_stack import NAMES, free_ports
from tests.test_train_job import write_config

pytestmark = pytest.mark.stack

WAIT_S = 480        # for a job to get going: Ray may be busy with other work on a small cluster


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
        # Unbuffered, so the test can follow a job's output while it runs.
        return {**STACK_ENV, **storage, "AWS_ENDPOINT_URL": own["DENOISE_S3_ENDPOINT"], "PYTHONUNBUFFERED": "1"}


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


def logged(log: Path, pattern: str):
    """A condition: the job's output has a line matching ``pattern``."""
    return lambda: re.search(pattern, log.read_text(), flags=re.M) is not None


def outage_while(job: subprocess.Popen, store: PrivateS3, log: Path, *, back_when=None,
                 timeout: int = 400) -> tuple[int, str]:
    """Kill S3 and keep it down until ``back_when()`` holds, or, without it, until the job has given up;
    start it again; then the job's exit status and output."""
    store.kill()
    try:
        assert job.poll() is None, "the job ended before S3 went away: nothing was tested"
        deadline = time.monotonic() + timeout
        while job.poll() is None and not (back_when and back_when()):
            assert time.monotonic() < deadline, f"S3 down for {timeout}s and still no end: {log.read_text()[-3000:]}"
            time.sleep(0.3)
        store.start()
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return job.returncode, log.read_text()


def assert_clear_failure(output: str, *, names: str) -> None:
    """A failed job says why in an `error:` line (what broke, here ``names``), not only a traceback."""
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert lines and names in lines[-1], output[-3000:]


# -- batch denoising ----------------------------------------------------------------------


@dataclass
class DenoiseJob:
    """Six small images and a tiny checkpoint in the private store; ``args`` lack only --lease-seconds."""

    env: dict[str, str]
    settings: Settings
    output: str
    keys: list[str]
    args: list[str]

    def recorded(self) -> set[str]:
        """The done records in OUTPUT/_state: what a rerun skips."""
        fs, done = fsspec_for(join(self.output, "_state", "done"), self.settings)
        fs.invalidate_cache()
        found = fs.find(done) if fs.exists(done) else []
        return {p for p in found if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")}

    def day(self, name: str) -> str:
        return join(self.output, "2024-06-01", name)

    def assert_complete(self) -> None:
        """Every image there, each key once in the manifest, no error left."""
        manifest = read_table(self.settings, self.day("manifest.parquet"))
        assert sorted(manifest["key"]) == self.keys and manifest["key"].is_unique
        assert (manifest["status"] == "done").all()
        assert images_under(self.settings, self.day("images")) == self.keys
        assert read_table(self.settings, self.day("errors.parquet")).empty


@pytest.fixture
def denoise_job(private_s3) -> DenoiseJob:
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
            "tests-faults", *SMALL]
    return DenoiseJob(env, settings, output, keys, args)


def test_denoise_rides_out_an_outage_and_a_rerun_does_only_what_failed(tmp_path, private_s3, denoise_job):
    job = denoise_job
    log = tmp_path / "denoise.log"
    # A 600 s lease is first renewed after 150 s, and the merge waits for S3 to come back (confirm
    # retries while the ttl lasts), so an outage that ends within it cannot stop the run.
    proc = start_job("denoise.py", *job.args, "--lease-seconds", "600", env=job.env, log=log)
    wait_until(job.recorded, job=proc, timeout=WAIT_S, what="a finished item")
    # S3 stays down until an item certainly failed in the outage.
    status, out = outage_while(proc, private_s3, log, back_when=logged(log, r"^failed: "))
    assert status == 0, out[-3000:]
    done, skipped, failed = summary_counts(out)
    # Ray Data reads lazily, so an input not read yet when S3 went away fails its read instead.
    failures = {key: "write" if what == "write failed" else "read" for key, what in
                re.findall(r"^failed: (\S+): (write failed|read failed|cannot read): ", out, flags=re.M)}
    assert failed >= 1 and len(failures) == failed and done + failed == len(job.keys) and skipped == 0, out[-3000:]
    failed_keys = list(failures)
    # What the outage let it record of them: a write failure is marked retry; a read failure is
    # "reported again" (docs/denoise.md). Neither is kept as final: the rerun does them all.
    errors = read_table(job.settings, job.day("errors.parquet"))
    assert set(errors["key"]) <= set(failed_keys), errors
    assert all(failures[key] == stage and retry == (stage == "write")
               for key, stage, retry in zip(errors["key"], errors["stage"], errors["retry"])), errors
    manifest = read_table(job.settings, job.day("manifest.parquet"))
    assert sorted(manifest["key"]) == sorted(set(job.keys) - set(failed_keys))

    rerun = run_again("denoise.py", *job.args, env=job.env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert summary_counts(rerun.stdout) == (failed, done, 0), rerun.stdout    # exactly what failed
    job.assert_complete()


def test_denoise_that_loses_its_lease_in_an_outage_fails_and_a_rerun_finishes(tmp_path, private_s3, denoise_job):
    job = denoise_job
    log = tmp_path / "denoise.log"
    # The shortest lease: S3 stays down until the job gives up, which it must once the lease went
    # unrenewed for 10 s (it may have been taken over), at the latest right before the merge.
    proc = start_job("denoise.py", *job.args, "--lease-seconds", "10", env=job.env, log=log)
    wait_until(job.recorded, job=proc, timeout=WAIT_S, what="a finished item")
    status, out = outage_while(proc, private_s3, log)
    assert status == EXIT_TRANSIENT, out[-3000:]
    assert_clear_failure(out, names="lease")
    recorded = len(job.recorded())
    assert 1 <= recorded < len(job.keys)

    # The lost lease was left behind (its run could not release it) and is stale by now.
    rerun = run_again("denoise.py", *job.args, "--lease-seconds", "600", env=job.env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "lease: took over the stale lease" in rerun.stdout, rerun.stdout
    assert summary_counts(rerun.stdout) == (len(job.keys) - recorded, recorded, 0), rerun.stdout
    job.assert_complete()


# -- training -------------------------------------------------------------------------------


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


# Two checkpoints, EVERY and STEPS, far enough apart (about 1000 patches of training, seconds even on an
# idle cluster) that S3 can go away between them for sure; one epoch holds them all (4 pairs x 528
# crops / 16 a batch = 132 steps), so the training data is read once, before that.
EVERY, STEPS = 64, 128


@dataclass
class TrainingJob:
    """A small training run in the private store; ``configure`` writes its config."""

    env: dict[str, str]
    settings: Settings
    folder: Path
    dataset: str
    storage: str
    name: str = "faulty"
    config: Path | None = None

    def configure(self, *, max_failures: int) -> None:
        self.config = write_config(self.folder, self.dataset, self.storage,
                                   data={"patch_size": 32, "crops_per_image": 528},
                                   train={"batch_size": 16, "steps": STEPS, "log_every": EVERY // 2},
                                   checkpoint={"every_steps": EVERY}, validation={"every_steps": EVERY},
                                   scaling={"num_workers": 1, "max_failures": max_failures})

    @property
    def args(self) -> list[str]:
        return ["--config", str(self.config), "--name", self.name]

    def start(self, log: Path) -> subprocess.Popen:
        """The job, once Ray has stored its record of the first checkpoint.

        From then on the controller touches storage only after the next upload: S3 failing under
        that record's write would be a controller error, which no max_failures retries.
        """
        job = start_job("train.py", *self.args, env=self.env, log=log)
        fs, path = fsspec_for(join(self.storage, self.name, "checkpoint_manager_snapshot.json"), self.settings)

        def recorded() -> bool:
            fs.invalidate_cache()
            latest = json.loads(fs.cat_file(path)).get("latest_checkpoint_result") or {}
            return latest.get("checkpoint_dir_name") == f"step-{EVERY:08d}"

        wait_until(recorded, job=job, timeout=WAIT_S, what=f"checkpoint {EVERY} recorded by Ray")
        return job

    def assert_resumed_and_finished(self, output: str) -> None:
        """Resumed from the first checkpoint, trained to the last step, whose folder is the newest and whole."""
        assert re.search(rf"resumed from checkpoint at step {EVERY}/{STEPS}\b", output), output[-4000:]
        assert f"step {STEPS}/{STEPS}" in output, output[-4000:]
        fs, run_dir = fsspec_for(join(self.storage, self.name), self.settings)
        fs.invalidate_cache()
        steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_dir) if p.rsplit("/", 1)[-1].startswith("step-"))
        assert steps[-1] == f"step-{STEPS:08d}", steps
        assert (stored_checkpoint(arrow_fs_for(self.storage, self.settings)[0], run_dir) or "").endswith(steps[-1])


@pytest.fixture
def training_job(tmp_path, private_s3, private_dataset):
    import mlflow

    env = private_s3.client_env()
    settings = load_settings(environ=env)
    storage = settings.uri("faults", f"checkpoints-{uuid.uuid4().hex[:8]}")
    job = TrainingJob(env, settings, tmp_path, private_dataset, storage)
    yield job
    if job.config is not None:
        registered = yaml.safe_load(job.config.read_text())["mlflow"]["registered_model"]
        try:
            mlflow.MlflowClient(STACK_ENV["MLFLOW_TRACKING_URI"]).delete_registered_model(registered)
        except Exception:  # never registered (the run failed before it got there)
            pass


def test_training_failed_by_an_outage_resumes_from_its_last_checkpoint(tmp_path, private_s3, training_job):
    job = training_job
    job.configure(max_failures=0)
    log = tmp_path / "train.log"
    proc = job.start(log)
    # S3 stays down until the job gives up, which it must: with no restart allowed, the next
    # checkpoint's upload fails the run.
    status, out = outage_while(proc, private_s3, log)
    assert status != 0, out[-4000:]
    assert_clear_failure(out, names=f"training run {job.name} failed")

    rerun = run_again("train.py", *job.args, env=job.env)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    job.assert_resumed_and_finished(rerun.stdout + rerun.stderr)


def test_training_rides_out_an_outage_between_checkpoints_by_restarting_from_the_last(tmp_path, private_s3,
                                                                                         training_job):
    job = training_job
    job.configure(max_failures=10)
    log = tmp_path / "train.log"
    proc = job.start(log)
    # S3 stays down until the next checkpoint's upload failed for good, after Ray's retries: the
    # worker logs its training function's error. A worker's failure, so the group restarts from the
    # first checkpoint (again while a restarted worker cannot download it yet).
    status, out = outage_while(proc, private_s3, log, back_when=logged(log, r"Error in training function"))
    assert status == 0, out[-4000:]
    job.assert_resumed_and_finished(out)
