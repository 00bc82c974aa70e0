"""Worker nodes lost and added while jobs run, on the local multi-node stack.

A node is lost the hard way: SIGKILL of its raylet and every worker process at once
(``stack.py kill-node``), then started again, as a replacement node would join a real cluster.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from pipeline.checkpoint import checkpoint_files
from pipeline.images import decode_image, encode_png
from pipeline.model import build_model
from pipeline.storage import fsspec_for, join, write_atomic
from tests.conftest import STACK, STACK_ENV
from tests.test_denoise_job import SMALL, images_under, noisy_photo, read_table, summary_counts
from tests.test_faults import start_job, wait_until
from tests.test_train_job import metric_steps, tiny_dataset, write_config  # noqa: F401 - tiny_dataset: a fixture

pytestmark = pytest.mark.stack

WORKERS = ("127.0.0.2", "127.0.0.3")


def kill_node(ip: str) -> None:
    subprocess.run([*STACK, "kill-node", str(WORKERS.index(ip))], check=True, capture_output=True, timeout=60)


def nodes_up(workers: int = 2) -> None:
    proc = subprocess.run([*STACK, "up", "ray", "--workers", str(workers)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def two_nodes_after(stack_env):
    """Whatever a test does to the nodes, the next one starts on two again."""
    yield
    nodes_up(2)


def finish(job, timeout: int = 400) -> str:
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return job.log_path.read_text()


def started(script: str, *args: str, log) -> subprocess.Popen:
    job = start_job(script, *args, env=STACK_ENV, log=log)
    job.log_path = log
    return job


def test_a_node_lost_mid_training_resumes_from_the_last_s3_checkpoint(tmp_path, settings, s3_prefix, tiny_dataset,
                                                                       two_nodes_after):
    """Two DDP workers spread over both nodes; rank 1's node dies after the step-8 checkpoint; the group is
    rebuilt from it and trains to the end in the same MLflow run, each step logged once, the model registered."""
    import mlflow
    import yaml

    storage = f"{s3_prefix}/checkpoints"
    config = write_config(tmp_path, tiny_dataset, storage, train={"steps": 32, "log_every": 4},
                          scaling={"num_workers": 2, "max_failures": 2, "resources_per_worker": {"CPU": 0.25}})
    log = tmp_path / "train.log"
    job = started("train.py", "--config", str(config), "--name", "node-lost", "--promote", log=log)
    placed = r"workers on nodes rank 0: (\S+), rank 1: (\S+)"
    wait_until(lambda: re.search(placed, log.read_text()) and "step 12/32" in log.read_text(), job=job,
               timeout=300, what="step 12 on two nodes")
    first, second = re.search(placed, log.read_text()).groups()
    assert {first, second} == set(WORKERS)  # SPREAD: one worker per node
    kill_node(second)
    nodes_up(2)
    out = finish(job)
    assert job.returncode == 0, out[-4000:]
    resumed = re.search(r"resumed from checkpoint at step (\d+)/32", out)
    assert resumed and int(resumed.group(1)) >= 8, out[-4000:]  # from S3, not from step 0
    assert "step 32/32" in out

    client = mlflow.MlflowClient(settings.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests-train").experiment_id],
                              filter_string=f"tags.`denoise.train_run` = '{storage}/node-lost'")
    assert len(runs) == 1  # one run across both attempts
    run = runs[0]
    assert metric_steps(client, run.info.run_id, "train_loss") == list(range(1, 33))  # no step twice
    assert metric_steps(client, run.info.run_id, "val_psnr") == [8, 16, 24, 32]
    assert set(run.data.tags["worker_nodes"].split(",")) <= set(WORKERS)
    name = yaml.safe_load(config.read_text())["mlflow"]["registered_model"]
    assert client.get_model_version_by_alias(name, "candidate").run_id == run.info.run_id


@pytest.fixture
def night(settings, s3_prefix):
    """A checkpoint and eight noisy photos in S3, and the job's arguments for them."""
    checkpoint, source, output = join(s3_prefix, "checkpoint"), join(s3_prefix, "in"), join(s3_prefix, "out")
    fs, _ = fsspec_for(s3_prefix, settings)
    for name, data in checkpoint_files(build_model("tiny"), T=50).items():
        write_atomic(fs, fsspec_for(join(checkpoint, name), settings)[1], data)
    keys = [f"{i:02d}.png" for i in range(8)]
    for i, key in enumerate(keys):
        write_atomic(fs, fsspec_for(join(source, key), settings)[1], encode_png(noisy_photo(128, 60 + i)))
    args = [source, output, "--model", checkpoint, "--sampler", "origin", "--steps", "25", "--date", "2024-07-01",
            "--experiment", "tests-nodes", "--workers", "2", *SMALL]
    return keys, args, output


def items_done(settings, output: str) -> int:
    """Items with a done record in the ledger so far."""
    fs, done = fsspec_for(join(output, "_state", "done"), settings)
    fs.invalidate_cache()
    return len(fs.find(done)) if fs.exists(done) else 0


def check_night(settings, output: str, keys: list[str]):
    """Every item exactly once in the manifest, done, its image whole; no error rows."""
    day = join(output, "2024-07-01")
    manifest = read_table(settings, join(day, "manifest.parquet"))
    assert sorted(manifest["key"]) == keys and manifest["key"].is_unique and (manifest["status"] == "done").all()
    assert images_under(settings, join(day, "images")) == keys
    fs, root = fsspec_for(join(day, "images"), settings)
    for key in keys:
        assert decode_image(fs.cat_file(f"{root}/{key}")).shape == (128, 128, 3)
    assert read_table(settings, join(day, "errors.parquet")).empty
    return manifest


def test_a_node_lost_mid_denoise_leaves_every_item_once_and_whole(tmp_path, settings, night, two_nodes_after):
    keys, args, output = night
    log = tmp_path / "denoise.log"
    job = started("denoise.py", *args, log=log)
    wait_until(lambda: items_done(settings, output) >= 2, job=job, timeout=300, what="two finished items")
    kill_node(WORKERS[1])
    nodes_up(2)
    out = finish(job)
    assert job.returncode == 0, out[-4000:]
    finished, skipped, failed = summary_counts(out)
    assert (finished, skipped, failed) == (len(keys), 0, 0), out[-4000:]
    manifest = check_night(settings, output, keys)
    assert set(manifest["node"]) <= set(WORKERS) and "" not in set(manifest["node"])


def test_a_node_added_while_denoise_runs_takes_work(tmp_path, settings, night, two_nodes_after):
    """Two model actors of 0.6 CPU cannot share the one 1-CPU node: the job waits for room for the second
    (nothing is read until all actors are placed), the node that joins gets it, and it denoises items too."""
    keys, args, output = night
    nodes_up(1)
    log = tmp_path / "denoise.log"
    job = started("denoise.py", *args, "--cpus-per-worker", "0.6", "--cpus-per-task", "0.2", "--actors-wait-s",
                  "240", log=log)
    wait_until(lambda: "pass 1: 8 input(s), 2 model actor(s)" in log.read_text(), job=job, timeout=180,
               what="the job starting its actors")
    time.sleep(3)
    assert items_done(settings, output) == 0  # waiting for the second actor
    nodes_up(2)
    out = finish(job)
    assert job.returncode == 0, out[-4000:]
    manifest = check_night(settings, output, keys)
    per_node = manifest["node"].value_counts().to_dict()
    assert set(per_node) == set(WORKERS), per_node  # the node that joined denoised some of the items
