"""jobs/denoise.py: clear failures before any cluster work (local folders, a moto server and a stub
MLflow, fast), the lease at the end of a run (its stages in this process, without Ray), and end to
end on the local stack (SeaweedFS, MLflow, Ray, marked ``stack``): outputs,
bad inputs, a driver killed mid-run and rerun (which takes over its stale lease, skips what was done
and survives MLflow going away after the merge). Skipping rules in detail are tested on the stage
functions in test_infer.py, the lease in test_ledger.py."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, run_job
from pipeline.archives import build_demo_inputs
from pipeline.checkpoint import checkpoint_files
from pipeline.images import decode_image, encode_png
from pipeline.model import build_model
from pipeline.settings import load_settings
from pipeline.ledger import LEASE, STATE, RunLease
from pipeline.storage import fsspec_for, join, strip_scheme, write_atomic
from tests.test_storage import free_port, moto_settings  # noqa: F401  (the moto server fixture)

# Fractional resources: the stack's Ray has 2 CPUs, shared with whatever else runs.
SMALL = ["--cpus-per-worker", "0.5", "--cpus-per-task", "0.25", "--task-memory-mb", "512"]
EXPERIMENT = "tests-denoise"


def put(settings, uri: str, data: bytes) -> None:
    fs, path = fsspec_for(uri, settings)
    write_atomic(fs, path, data)


def images_under(settings, uri: str) -> list[str]:
    fs, root = fsspec_for(uri, settings)
    return sorted(p[len(root) + 1:] for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith("."))


def read_table(settings, uri: str) -> pd.DataFrame:
    fs, path = fsspec_for(uri, settings)
    with fs.open(path, "rb") as f:
        return pd.read_parquet(f)


def summary_counts(stdout: str) -> tuple[int, int, int]:
    found = re.search(r"summary: (\d+) done, (\d+) skipped, (\d+) failed", stdout)
    assert found, stdout
    return tuple(int(g) for g in found.groups())


def noisy_photo(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


class MlflowStub:
    """Answers MLflow's /health and nothing else, until stopped: its port is then dead."""

    def __init__(self):
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mlflow_stub(monkeypatch):
    stub = MlflowStub()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stub.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield stub
    stub.stop()


def local_checkpoint(folder) -> str:
    folder.mkdir()
    for file_name, data in checkpoint_files(build_model("tiny"), T=20).items():
        (folder / file_name).write_bytes(data)
    return str(folder)


def test_cli_options_and_defaults_are_the_config_fields():
    from jobs.denoise import parse_args
    from pipeline.infer import DenoiseConfig

    args = vars(parse_args(["in", "out"]))
    assert set(args) == set(DenoiseConfig.model_fields)
    assert all(v is None for k, v in args.items() if k not in ("input", "output"))
    given = vars(parse_args(["in", "out", "--steps", "4", "--sampler", "origin", "--lease-seconds", "60"]))
    assert given == args | {"steps": 4, "sampler": "origin", "lease_seconds": 60.0}
    with pytest.raises(SystemExit):
        parse_args(["in", "out", "--sampler", "ddim"])


def test_a_live_lease_on_output_makes_a_second_run_refuse_with_one_line(tmp_path, mlflow_stub, monkeypatch, capsys):
    from jobs.denoise import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode_png(noisy_photo(16, 0)))
    output = str(tmp_path / "out")
    holder = RunLease(output, load_settings(), run_id="nightly-1", ttl_s=600).acquire()
    assert main([str(tmp_path / "in"), output, "--model", local_checkpoint(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: OUTPUT is in use by run nightly-1 on ")
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == [LEASE]  # nothing else written
    holder.release()


@pytest.fixture
def without_ray(monkeypatch):
    """jobs/denoise.py's stages in this process, one item after the other, instead of Ray Data.

    Append a function to the returned list to have it called with each item's status row as
    the driver receives it.
    """
    import pipeline.cluster
    import pipeline.infer as infer

    hooks = []

    def build_dataset(config, settings, sources, *, index, model_ref, model_version, run_id):
        model = infer.Denoise(model_uri=model_ref, settings=settings, sampler=config.sampler, steps=config.steps,
                              tile=config.tile, overlap=config.overlap, batch_size=config.batch_size)

        def iter_rows():
            for source in sources:
                for row in infer.expand_source({"rel": source.rel, "uri": source.uri, "size": source.size},
                                               settings=settings, limits=config.limits, index=index,
                                               max_pixels=config.max_pixels):
                    batch = model({k: np.array([v], dtype=object) for k, v in row.items()})
                    status = infer.finish_row({k: v[0] for k, v in batch.items()}, settings=settings,
                                              config=config, model_ref=model_ref, model_version=model_version,
                                              run_id=run_id, index=index)
                    for hook in hooks:
                        hook(status)
                    yield status

        return types.SimpleNamespace(iter_rows=iter_rows)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(pipeline.cluster, "init_ray", lambda settings: None)
    monkeypatch.setattr(infer, "build_dataset", build_dataset)
    return hooks


def two_images_and_a_model(tmp_path) -> list[str]:
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"{i}.png").write_bytes(encode_png(noisy_photo(16, i)))
    return [str(tmp_path / "in"), str(tmp_path / "out"), "--model", local_checkpoint(tmp_path / "ckpt"),
            "--steps", "2"]


def test_a_run_whose_lease_was_taken_over_stops_before_merging_and_its_work_is_merged_next_run(
        tmp_path, mlflow_stub, without_ray, capsys):
    """The takeover comes after the renewal thread's last look (it renews every 150s here): the
    compare-and-swap right before the merge is what catches it."""
    from jobs.denoise import main

    args = two_images_and_a_model(tmp_path)
    lease, done = tmp_path / "out" / STATE / LEASE, tmp_path / "out" / STATE / "done" / "undated"
    other = []

    def take_over_after_the_first_item(row):
        if not other:
            os.utime(lease, (time.time() - 700, time.time() - 700))  # as if this run had not renewed for 700s
            other.append(RunLease(args[1], load_settings(), run_id="nightly-2", ttl_s=600).acquire(log=print))

    without_ray.append(take_over_after_the_first_item)
    assert main(args) == 75  # transient: the next run merges this one's work
    captured = capsys.readouterr()
    assert "lease: took over the stale lease of run" in captured.out
    assert captured.err.count("\n") == 1 and re.match(
        r"error: the lease \S+ was taken over by another run; this run stopped before merging \(its finished "
        r"items are recorded, and the next run skips them\)$", captured.err)
    assert len(list(done.iterdir())) == 2  # both items finished and recorded
    assert not list((tmp_path / "out").glob("*.parquet"))  # nothing merged
    assert json.loads(lease.read_bytes())["run_id"] == "nightly-2"  # the other run's lease is left alone

    other[0].release()
    without_ray.clear()
    assert main(args) == 0
    assert summary_counts(capsys.readouterr().out) == (0, 2, 0)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert sorted(manifest["key"]) == ["0.png", "1.png"] and manifest["run_id"].nunique() == 1
    assert not lease.exists()


def test_sigterm_stops_the_run_releases_the_lease_and_keeps_finished_items(tmp_path, mlflow_stub, without_ray):
    """What ``ray job stop`` sends first: the driver unwinds (exit 143) instead of leaving its lease
    to block reruns for --lease-seconds; only SIGKILL does that."""
    from jobs.denoise import main

    args = two_images_and_a_model(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    without_ray.append(lambda row: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "out" / STATE / LEASE).exists()
    assert len(list((tmp_path / "out" / STATE / "done" / "undated").iterdir())) == 1
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_missing_output_bucket_fails_before_anything_is_written(moto_settings, mlflow_stub, monkeypatch,  # noqa: F811
                                                                  capsys):
    from jobs.denoise import main

    monkeypatch.setenv("DENOISE_S3_ENDPOINT", moto_settings.s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    put(moto_settings, "s3://unit/missing-bucket/in/a.png", encode_png(noisy_photo(16, 0)))
    fs, _ = fsspec_for("s3://unit", moto_settings)
    before = fs.find("unit")
    assert main(["s3://unit/missing-bucket/in", "s3://no-such-bucket/out", "--model", "s3://unit/ckpt"]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket' does not exist" in err and "fix the s3:// URI" in err
    fs.invalidate_cache()
    assert fs.find("unit") == before


@pytest.fixture(scope="module")
def registered_model(settings):
    """A tiny denoiser registered as ``<name>@champion`` (untrained: the head is zero, so it is the identity)."""
    import mlflow

    from pipeline.modelstore import log_denoiser

    name = f"denoise-job-test-{uuid.uuid4().hex[:8]}"
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="register-test-model"):
        info = log_denoiser(build_model("tiny"), T=20, registered_name=name)
    client = mlflow.MlflowClient(settings.mlflow_uri)
    client.set_registered_model_alias(name, "champion", info.registered_model_version)
    yield name, str(info.registered_model_version)
    client.delete_registered_model(name)


@pytest.mark.stack
def test_the_registered_version_serves_through_mlflow_pyfunc_with_its_requirements(settings, registered_model):
    import mlflow
    from mlflow.artifacts import download_artifacts

    from pipeline.modelstore import SERVING_PACKAGES

    name, version = registered_model
    uri = f"models:/{name}/{version}"
    mlflow.set_tracking_uri(settings.mlflow_uri)
    noisy = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    served = mlflow.pyfunc.load_model(uri).predict(noisy)
    np.testing.assert_allclose(served, noisy, atol=1e-5)  # the untrained model is the identity
    requirements = [line for line in Path(download_artifacts(artifact_uri=f"{uri}/requirements.txt")).read_text()
                    .splitlines() if not line.startswith("--")]  # the torch index line (test_modelstore.py)
    assert sorted(r.split("==")[0] for r in requirements) == sorted(SERVING_PACKAGES)
    assert all("==" in r and "+" not in r for r in requirements)


@pytest.mark.stack
def test_nightly_run_writes_outputs_metrics_and_reports_every_bad_input(settings, s3_prefix, registered_model):
    import mlflow

    name, version = registered_model
    demo = build_demo_inputs(join(s3_prefix, "demo"), settings, size=64)
    source, output = demo["input"], join(s3_prefix, "out")
    put(settings, join(source, "corrupt.png"), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    put(settings, join(source, "zero.png"), b"")
    put(settings, join(source, "notes.txt"), b"not an image")
    put(settings, join(source, "huge.png"), encode_png(noisy_photo(200, 1)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:  # names as raw bytes
        for member, data in (("ok/fine.png", encode_png(noisy_photo(40, 2))), ("../evil.png", b"x" * 10),
                             ("\udcff.png", encode_png(noisy_photo(24, 3)))):  # b"\xff.png": not UTF-8
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    put(settings, join(source, "evil.tar"), buffer.getvalue())
    args = [source, output, "--model", f"models:/{name}@champion", "--reference", demo["reference"],
            "--steps", "2", "--tile", "48", "--date", "2024-05-01", "--experiment", EXPERIMENT,
            "--max-megapixels", "0.03", *SMALL]

    first = run_job("denoise.py", *args, timeout=400)
    assert first.returncode == 0, first.stdout + first.stderr
    assert summary_counts(first.stdout) == (7, 0, 5)

    day = join(output, "2024-05-01")
    good = sorted(demo["keys"] + ["evil.tar/ok/fine.png", "evil.tar/%FF.png"])
    assert images_under(settings, join(day, "images")) == good
    manifest = read_table(settings, join(day, "manifest.parquet"))
    assert list(manifest["key"]) == good and (manifest["status"] == "done").all()
    assert (manifest["model_uri"] == f"models:/{name}/{version}").all() and (manifest["model_version"] == version).all()
    with_ref = manifest[~manifest["key"].str.startswith("evil.tar/")]
    assert with_ref["psnr_in"].notna().all() and with_ref["ssim_out"].notna().all()
    # The untrained model is the identity, so the output scores are the input's.
    assert np.allclose(with_ref["psnr_out"], with_ref["psnr_in"], atol=0.05)
    fine = manifest.set_index("key").loc["evil.tar/ok/fine.png"]
    assert pd.isna(fine["psnr_in"]) and fine["note"] == "no reference" and fine["sigma_in"] > 0
    fs, _ = fsspec_for(day, settings)
    out_png = decode_image(fs.cat_file(strip_scheme(join(day, "images", demo["keys"][0]))))
    assert out_png.shape[2] == 3 and out_png.dtype == np.uint8 and max(out_png.shape[:2]) == 64

    errors = read_table(settings, join(day, "errors.parquet")).set_index("key")["reason"].to_dict()
    assert set(errors) == {"corrupt.png", "zero.png", "notes.txt", "huge.png", "evil.tar/../evil.png"}
    assert errors["zero.png"] == "zero-byte file" and "too large" in errors["huge.png"]
    assert "unsafe member path" in errors["evil.tar/../evil.png"] and "not an image" in errors["notes.txt"]
    everything = images_under(settings, s3_prefix)
    assert not [p for p in everything if p.endswith("evil.png")], "an unsafe member was written"

    client = mlflow.MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id], f"tags.output = '{day}'")
    assert run.info.run_name == "batch-denoise-2024-05-01"
    assert run.data.tags["model_version"] == version and run.data.tags["model_name"] == name
    assert run.data.metrics["items_done"] == 7 and run.data.metrics["items_failed"] == 5
    assert "mean_psnr_gain" in run.data.metrics and "mean_sigma_reduction" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "errors.json", "samples"} <= artifacts


@pytest.mark.stack
def test_driver_killed_mid_run_then_rerun_processes_each_item_exactly_once(settings, s3_prefix, mlflow_stub,
                                                                          monkeypatch, capsys):
    """The rerun (in this process) takes over the killed driver's stale lease, redoes only what was not
    done, and when MLflow goes away right after the merge, still exits 0 with one warning."""
    import pipeline.infer as infer
    from jobs.denoise import main

    checkpoint = join(s3_prefix, "checkpoint")
    for file_name, data in checkpoint_files(build_model("tiny"), T=50).items():
        put(settings, join(checkpoint, file_name), data)
    source, output = join(s3_prefix, "in"), join(s3_prefix, "out")
    count = 12
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for i in range(count):
            data = encode_png(noisy_photo(128, 10 + i))
            info = tarfile.TarInfo(f"frames/{i:02d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    put(settings, join(source, "night.tar.gz"), buffer.getvalue())
    args = [source, output, "--model", checkpoint, "--steps", "25", "--experiment", EXPERIMENT,
            "--lease-seconds", "10", *SMALL]
    done_markers = join(output, "_state", "done")

    driver = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "denoise.py"), *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    fs, markers = fsspec_for(done_markers, settings)
    try:
        while time.time() < deadline and driver.poll() is None:
            fs.invalidate_cache()
            if fs.exists(markers) and fs.find(markers):
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be interrupted"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    time.sleep(12)  # let Ray reap the dead driver's tasks and actors, and its 10 s lease go stale
    before = images_under(settings, done_markers)
    assert 0 < len(before) < count
    lease_path = strip_scheme(join(output, STATE, LEASE))
    assert fs.exists(lease_path), "the killed driver's lease should still be there"

    real_merge = infer.merge_state

    def merge_then_mlflow_goes_away(**kwargs):
        merged = real_merge(**kwargs)
        mlflow_stub.stop()
        return merged

    monkeypatch.setattr(infer, "merge_state", merge_then_mlflow_goes_away)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lease: took over the stale lease of run" in out
    [warning] = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "outputs and manifest are complete, but the MLflow run could not be logged" in warning
    assert "mlflow run: not logged" in out
    done, skipped, failed = summary_counts(out)
    assert (done, skipped, failed) == (count - len(before), len(before), 0)
    keys = [f"night.tar.gz/frames/{i:02d}.png" for i in range(count)]
    manifest = read_table(settings, join(output, "manifest.parquet"))
    assert sorted(manifest["key"]) == keys and manifest["key"].is_unique
    assert manifest["run_id"].nunique() == 2  # rows from the killed run are kept, not redone
    assert len(images_under(settings, done_markers)) == count
    assert images_under(settings, join(output, "images")) == keys
    fs.invalidate_cache()
    assert not fs.exists(lease_path), "the lease is released at the end"


@pytest.mark.stack
def test_unknown_model_and_empty_input_fail_fast_with_a_clear_message(settings, s3_prefix, capsys):
    """The job's main in this process: these fail before any Ray work, so no subprocess is needed."""
    from jobs.denoise import main

    put(settings, join(s3_prefix, "in", "a.png"), encode_png(noisy_photo(16, 0)))
    missing = "models:/no-such-denoiser-for-tests@champion"
    assert main([join(s3_prefix, "in"), join(s3_prefix, "out"), "--model", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err and "Traceback" not in err

    assert main([join(s3_prefix, "nothing-here"), join(s3_prefix, "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nothing-here" in err

    with pytest.raises(SystemExit) as usage:
        main(["--help"])
    assert usage.value.code == 0
    out = capsys.readouterr().out
    assert "--gpus-per-worker" in out and "Exit status" in out
