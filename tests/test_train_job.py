"""jobs/train.py on the real stack: checkpoints in S3, MLflow run and registry, a killed worker, MLflow going away."""

import http.client
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.demo_data import demo_pairs
from pipeline.images import encode_png
from pipeline.shards import DatasetError, write_json, write_split

from .conftest import ROOT, run_job

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def tiny_dataset(settings):
    """Four train and two val pairs of 96 px demo photos, written with the shard writer."""
    uri = settings.uri("tests", f"train-data-{uuid.uuid4().hex[:8]}")
    pairs = demo_pairs(variants=1, size=96, names=("astronaut", "chelsea", "coffee", "rocket", "camera", "coins"))
    rows = {"train": [], "val": []}
    for i, (key, clean, noisy) in enumerate(pairs):
        split = "val" if i >= 4 else "train"
        rows[split].append({"key": key, "split": split, "clean": encode_png(clean), "noisy": encode_png(noisy),
                            "height": clean.shape[0], "width": clean.shape[1]})
    for split, split_rows in rows.items():
        write_split(split_rows, uri, split, settings)
    write_json(uri, "dataset.json", {"counts": {"train": 4, "val": 2}, "dataset_hash": "tiny-" + uri[-8:]}, settings)
    return uri


def write_config(tmp_path, dataset: str, storage: str, **sections) -> Path:
    config = {
        "dataset": dataset, "storage_path": storage,
        "data": {"patch_size": 32, "crops_per_image": 64},
        "model": {"preset": "tiny", "width": 8},
        "diffusion": {"T": 100},
        "optimizer": {"lr": 1e-3, "warmup_steps": 4},
        "train": {"batch_size": 8, "steps": 24, "log_every": 4},
        "validation": {"every_steps": 8, "sampler": "improved", "sampler_steps": 3, "crop": 48, "limit": 2},
        "checkpoint": {"every_steps": 8, "num_to_keep": 2},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "max_failures": 1},
        "mlflow": {"experiment": "tests-train", "registered_model": f"test-denoiser-{uuid.uuid4().hex[:8]}"},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_train_killed_worker_resumes_and_registers(tmp_path, settings, s3_prefix, tiny_dataset):
    """Two DDP workers; rank 0 SIGKILLs itself at step 12; the group restarts from step 8 and finishes."""
    import mlflow

    from pipeline.modelstore import load_denoiser
    from pipeline.storage import s3fs_filesystem, strip_scheme

    storage = f"{s3_prefix}/checkpoints"
    config = write_config(tmp_path, tiny_dataset, storage,
                          scaling={"num_workers": 2, "max_failures": 2}, fault_injection={"kill_at_step": 12})
    proc = run_job("train.py", "--config", str(config), "--name", "killed", "--promote", timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "fault injection: rank 0 kills its own process at step 12" in out
    assert "resumed from checkpoint at step 8/24" in out
    assert "step 24/24" in out and "samples/s" in out and "ETA" in out

    # checkpoints: the two best by val_psnr plus the latest, each complete and loadable as a model
    fs = s3fs_filesystem(settings)
    run_dir = f"{strip_scheme(storage)}/killed"
    checkpoints = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_dir) if p.rsplit("/", 1)[-1].startswith("step-"))
    assert "step-00000024" in checkpoints and 1 <= len(checkpoints) <= 3, checkpoints
    last = f"{run_dir}/step-00000024"
    names = {p[len(last) + 1:] for p in fs.find(last)}
    assert {"model.pt", "model.json", "train_state.pt", "train_state.json", "rng/rank-0.pt", "rng/rank-1.pt"} <= names
    meta = yaml.safe_load(fs.cat_file(f"{last}/train_state.json"))
    assert meta["step"] == 24 and meta["total_steps"] == 24
    loaded = load_denoiser(f"s3://{last}", settings)
    assert loaded.T == 100 and loaded.model.config.width == 8

    # MLflow: one run across both attempts, no step logged twice
    client = mlflow.MlflowClient(settings.mlflow_uri)
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.tags["denoise.train_run"] == f"{storage}/killed" and run.info.run_name == "killed"
    params = run.data.params
    assert params["optimizer.lr"] == "0.001" and params["dataset"] == tiny_dataset
    assert params["dataset_hash"] == "tiny-" + tiny_dataset[-8:] and params["total_steps"] == "24"
    if (ROOT / ".git").exists():
        assert len(params["git_commit"]) == 40
    assert metric_steps(client, run.info.run_id, "train_loss") == list(range(1, 25))
    assert metric_steps(client, run.info.run_id, "val_psnr") == [8, 16, 24]
    for key in ("lr", "val_ssim", "val_psnr_direct", "val_psnr_noisy", "val_ssim_noisy"):
        assert metric_steps(client, run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "images" in artifacts and "promotion.json" in artifacts
    assert client.list_artifacts(run.info.run_id, "images")

    # registry: the version carries alias candidate, and --promote made it champion (there was none)
    name = yaml.safe_load(config.read_text())["mlflow"]["registered_model"]
    candidate = client.get_model_version_by_alias(name, "candidate")
    assert candidate.run_id == run.info.run_id
    assert client.get_model_version_by_alias(name, "champion").version == candidate.version
    assert run.data.metrics["promotion_candidate_val_psnr"] == pytest.approx(run.data.metrics["val_psnr"])
    assert f"registered {name} version {candidate.version} (alias candidate)" in out
    assert "now champion" in out


def test_a_checkpoint_ray_never_registered_is_still_resumed(tmp_path, settings, s3_prefix, tiny_dataset):
    """An S3 outage between a checkpoint's upload and its registration leaves a whole folder Ray does not know.

    Deleting Ray's checkpoint record stands in for that outage, deterministically.
    """
    from pipeline.storage import s3fs_filesystem, strip_scheme

    storage = f"{s3_prefix}/checkpoints"
    small = {"train": {"steps": 12, "log_every": 4}, "checkpoint": {"every_steps": 4},
             "validation": {"every_steps": 4, "limit": 1}}
    config = write_config(tmp_path, tiny_dataset, storage, **small,
                          scaling={"max_failures": 0}, fault_injection={"kill_at_step": 8})
    first = run_job("train.py", "--config", str(config), "--name", "unregistered", timeout=300)
    assert first.returncode != 0 and "kills its own process at step 8" in first.stdout + first.stderr  # after step 4's

    fs = s3fs_filesystem(settings)
    record = f"{strip_scheme(storage)}/unregistered/checkpoint_manager_snapshot.json"

    def forget_checkpoints():
        fs.invalidate_cache()
        assert fs.exists(record)
        fs.rm(record)

    forget_checkpoints()
    config = write_config(tmp_path, tiny_dataset, storage, **small)
    rerun = run_job("train.py", "--config", str(config), "--name", "unregistered", timeout=300)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "resumed from checkpoint at step 4/12 (found complete in storage" in out, out[-4000:]
    assert "step 12/12" in out and "step 4/12 |" not in out and "registered" in out

    forget_checkpoints()    # now the final checkpoint: nothing left to train, and the run still has a result
    again = run_job("train.py", "--config", str(config), "--name", "unregistered", timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "resumed from checkpoint at step 12/12 (found complete in storage" in out
    assert "trained to step 12" in out and "registered" in out


class _ForwardingProxy(BaseHTTPRequestHandler):
    """Forwards every request to the real MLflow server until the test stops it."""

    target = ("127.0.0.1", 5000)

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(*self.target, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


def test_mlflow_going_away_mid_run_does_not_stop_training(tmp_path, settings, s3_prefix, tiny_dataset):
    """Rank 0 logs through a proxy that the test shuts down after a few steps."""
    from pipeline.storage import s3fs_filesystem, strip_scheme

    url = urlparse(settings.mlflow_uri)
    handler = type("Proxy", (_ForwardingProxy,), {"target": (url.hostname, url.port or 80)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"

    storage = f"{s3_prefix}/checkpoints"
    config = write_config(tmp_path, tiny_dataset, storage, train={"steps": 20},
                          validation={"every_steps": 20}, checkpoint={"every_steps": 20})
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config),
                             "--name", "no-mlflow"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": proxy})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 4/20" in line:
                server.shutdown()
                server.server_close()
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.server_close()
    out = "".join(lines)
    assert "step 4/20" in out and "step 20/20" in out, out[-4000:]
    assert proc.returncode == 75, out[-4000:]  # transient: a rerun once MLflow is back registers it
    assert "warning: MLflow logging failed" in out
    assert "error: training finished but the model was not registered: cannot reach the MLflow tracking server" in out
    assert "rerun with --name no-mlflow" in out
    fs = s3fs_filesystem(settings)
    assert fs.exists(f"{strip_scheme(storage)}/no-mlflow/step-00000020/model.pt")


def test_missing_dataset_or_mlflow_is_a_clear_error_before_ray(tmp_path, settings, s3_prefix, tiny_dataset):
    from pipeline.config import load_config
    from pipeline.train import check_dataset

    unreachable = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "RAY_ADDRESS": "127.0.0.1:1"}
    config = write_config(tmp_path, tiny_dataset, f"{s3_prefix}/checkpoints")
    proc = run_job("train.py", "--config", str(config), env=unreachable, timeout=120)
    assert proc.returncode == 75
    assert proc.stderr.strip().startswith("error: cannot reach the MLflow tracking server at http://127.0.0.1:9")

    config = write_config(tmp_path, s3_prefix, f"{s3_prefix}/checkpoints")
    proc = run_job("train.py", "--config", str(config), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: no dataset.json at {s3_prefix}: not a dataset written by jobs/ingest.py (ingest one first, or check "
        f"the URI)"]

    write_json(s3_prefix, "dataset.json", {"counts": {"train": 0, "val": 2}}, settings)
    with pytest.raises(DatasetError, match=r"has no 'train' pairs"):
        check_dataset(load_config(config), settings)


def test_promotion_compares_only_runs_measured_alike(settings):
    """A higher val_psnr on other data or other validation settings does not take the champion alias."""
    import mlflow

    from pipeline.modelstore import promote

    client = mlflow.MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name("tests-train")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("tests-train")
    name = f"test-promote-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    same = {"dataset_hash": "h1", "validation.sampler": "improved", "validation.sampler_steps": "10",
            "validation.crop": "128", "validation.limit": "8"}

    def version(score: float, **params) -> str:
        run = client.create_run(experiment_id)
        for key, value in {**same, **params}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "val_psnr", score)
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_registered_model_alias(name, "candidate", mv.version)
        return str(mv.version)

    try:
        first = version(25.0)
        assert promote(name, first, settings=settings)["promoted"]  # no champion yet
        other_data = version(30.0, dataset_hash="h2")
        decision = promote(name, other_data, settings=settings)
        assert not decision["promoted"] and decision["previous_version"] == first
        assert "not comparable: measured differently (dataset_hash h1 -> h2)" in decision["reason"]
        assert client.get_model_version_by_alias(name, "champion").version == first
        assert client.get_model_version_by_alias(name, "candidate").version == other_data  # stays candidate
        other_crop = version(31.0, **{"validation.crop": "256"})
        assert "validation.crop 128 -> 256" in promote(name, other_crop, settings=settings)["reason"]
        worse = version(24.0)
        assert promote(name, worse, settings=settings)["reason"] == "val_psnr 24.0000 does not beat 25.0000"
        better = version(26.0)
        assert promote(name, better, settings=settings)["promoted"]
        assert client.get_model_version_by_alias(name, "champion").version == better
    finally:
        client.delete_registered_model(name)
