"""Evaluation job: same pairs for every method, one row per cell, failures kept as rows.

The dataset is tiny: crops of scikit-image's photos with white Gaussian noise, where the
classic denoisers must beat the noisy input; the model is an untrained tiny UNet, so only
its plumbing (rows, timing, MLflow links) is checked, not its quality.
"""

import io
import re
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from pipeline import baselines, report
from pipeline import evaluate as ev
from pipeline.demo_data import demo_image
from pipeline.images import decode_png_float, encode_png, to_float, to_uint8
from pipeline.metrics import psnr, sidd_protocol, ssim
from pipeline.pairs import pair_hash
from pipeline.shards import DatasetError, center_crop, validation_pairs, write_json, write_split
from pipeline.storage import fsspec_for, join

NAMES = ("astronaut", "chelsea", "coffee", "rocket")
SIGMA = 0.08
T = 4


def _gaussian_pair(name: str, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    clean = to_uint8(center_crop(to_float(demo_image(name, 96)), size))
    noisy = to_float(clean) + np.random.default_rng(seed).normal(0, SIGMA, clean.shape)
    return clean, to_uint8(np.clip(noisy, 0, 1))


def _row(key: str, clean: np.ndarray, noisy: np.ndarray | None) -> dict:
    clean_png, noisy_png = encode_png(clean), None if noisy is None else encode_png(noisy)
    return {"key": key, "split": "val", "clean": clean_png, "noisy": noisy_png, "height": clean.shape[0],
            "width": clean.shape[1], "source": "test", "layout": "mirrored", "meta": "{}",
            "pair_hash": pair_hash(clean_png, noisy_png)}


def _write_dataset(uri: str, rows: list[dict], settings) -> str:
    write_split(rows, uri, "val", settings)
    write_json(uri, "dataset.json", {"layout": "mirrored", "source": "test", "counts": {"val": len(rows)}}, settings)
    return uri


@pytest.fixture(scope="module")
def gaussian_dataset(settings):
    """Four good pairs plus one whose sides differ in size (every cell of it must fail), in key order:
    p0_astronaut, p1_chelsea, p1_mismatch, p2_coffee, p3_rocket."""
    rows = [_row(f"p{i}_{name}", *_gaussian_pair(name, i)) for i, name in enumerate(NAMES)]
    clean, noisy = _gaussian_pair("coins", 9)
    rows.append(_row("p1_mismatch", clean, np.ascontiguousarray(noisy[:56])))
    return _write_dataset(settings.uri("tests", uuid.uuid4().hex[:12], "gaussian"), rows, settings)


@pytest.fixture(scope="module")
def registered_model(settings):
    """An untrained tiny UNet (T = 4) registered under a name no other test uses."""
    import mlflow

    from pipeline.model import build_model
    from pipeline.modelstore import log_denoiser

    name = f"eval-test-{uuid.uuid4().hex[:8]}"
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_experiment("tests")
    with mlflow.start_run(run_name=name):
        info = log_denoiser(build_model("tiny", width=8), T=T, steps=T, registered_name=name)
    yield name, str(info.registered_model_version)
    mlflow.MlflowClient(settings.mlflow_uri).delete_registered_model(name)


# ---------------------------------------------------------------- pure parts


def test_config_is_validated_once():
    with pytest.raises(ev.EvaluationError, match="unknown method.*sharpen.*choose from"):
        ev.EvalConfig.of(dataset="d", methods=("noisy", "sharpen"))
    with pytest.raises(ev.EvaluationError, match="steps must be positive"):
        ev.EvalConfig.of(dataset="d", steps=(0, 2))
    config = ev.EvalConfig.of(dataset="d", steps=(5, 1, 5), methods=("tv", "tv", "improved"))
    assert config.steps == (1, 5) and config.methods == ("tv", "improved") and config.samplers == ["improved"]


def test_cells_per_pair():
    pair = {"key": "a", "clean": b"c", "noisy": b"n"}
    items = ev.work_items(pair, methods=["noisy", "direct", "improved"], steps=[1, 4], preview_keys=["a"])
    assert [(i["method"], i["steps"]) for i in items] == [("noisy", None), ("direct", 1), ("improved", 1),
                                                          ("improved", 4)]
    assert all(i["preview"] and i["clean"] == b"c" for i in items)
    assert not any(i["self_ensemble"] for i in items)
    ensembled = ev.work_items(pair, methods=["noisy", "improved"], steps=[4], preview_keys=[], self_ensemble=True)
    assert [(i["method"], i["self_ensemble"]) for i in ensembled] == [("noisy", False), ("improved", True)]


def test_item_scores_match_metrics_and_failures_become_rows():
    clean, noisy = _gaussian_pair("chelsea", 0)
    item = {"key": "k", "method": "noisy", "steps": None, "clean": encode_png(clean), "noisy": encode_png(noisy)}
    row = ev.evaluate_item(item, crop=None, sidd=False)
    a, b = decode_png_float(item["clean"]), decode_png_float(item["noisy"])
    assert row["status"] == "ok" and row["reason"] is None
    assert row["psnr"] == pytest.approx(psnr(a, b), abs=1e-9) and row["ssim"] == pytest.approx(ssim(a, b), abs=1e-9)
    assert row["megapixels"] == pytest.approx(64 * 64 / 1e6)

    big_clean, big_noisy = _gaussian_pair("astronaut", 1, size=96)
    tiled = {**item, "clean": encode_png(np.tile(big_clean, (3, 3, 1))),
             "noisy": encode_png(np.tile(big_noisy, (3, 3, 1)))}
    sidd_row = ev.evaluate_item(tiled, crop=None, sidd=True)  # 288x288: one 256 block
    expected = sidd_protocol(decode_png_float(tiled["clean"]), decode_png_float(tiled["noisy"]))
    assert sidd_row["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)

    mismatched = ev.evaluate_item({**item, "noisy": encode_png(np.ascontiguousarray(noisy[:56]))}, crop=48, sidd=False)
    assert mismatched["status"] == "failed" and "clean 64x64 and noisy 64x56 differ in size" in mismatched["reason"]
    broken = ev.evaluate_item({**item, "noisy": b"\x89PNG\r\n\x1a\n broken"}, crop=None, sidd=False)
    assert broken["status"] == "failed" and broken["psnr"] is None and broken["reason"]
    no_model = ev.evaluate_item({**item, "method": "improved", "steps": 2}, crop=None, sidd=False)
    assert no_model["status"] == "failed" and "no model" in no_model["reason"]


def test_summary_picks_best_k():
    rows = [{"key": k, "method": "improved", "steps": s, "status": "ok", "psnr": p, "ssim": 0.5, "sec_per_mp": 1.0}
            for k in "ab" for s, p in ((1, 20.0), (2, 22.0), (4, 21.0))]
    rows.append({"key": "c", "method": "improved", "steps": 2, "status": "failed", "psnr": None, "ssim": None,
                 "sec_per_mp": None})
    summary = report.summarize(rows, ["improved"])
    assert [(r["steps"], r["ok"], r["failed"]) for r in summary] == [(1, 2, 0), (2, 2, 1), (4, 2, 0)]
    assert report.best_steps(summary)["improved"]["steps"] == 2


# ---------------------------------------------------------------- on the stack


@pytest.mark.stack
def test_evaluate_job_on_ray(settings, s3_prefix, gaussian_dataset, registered_model):
    import mlflow

    name, version = registered_model
    report = join(s3_prefix, "report")
    proc = run_job("evaluate.py", gaussian_dataset, "--model", f"models:/{name}/{version}", "--steps", "1,8",
                   "--limit", "4", "--crop", "none", "--report", report, "--experiment", "tests-evaluate",
                   "--actors", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"nl_means: 4/4 cells, 1 failed", proc.stdout), proc.stdout
    assert "K clipped to the model's T = 4" in proc.stdout

    fs, root = fsspec_for(report, settings)
    results = pq.read_table(io.BytesIO(fs.cat_file(join(root, "results.parquet")))).to_pylist()
    classic = ["noisy", "nl_means", "wavelet", "tv"]
    # the first 4 keys; bm3d is optional: 4 x (4 classic [+ bm3d] + direct + origin x 2 K + improved x 2 K)
    per_pair = len({r["method"] for r in results} - {"direct", "origin", "improved"}) + 1 + 2 + 2
    assert len(results) == 4 * per_pair and "p3_rocket" not in {r["key"] for r in results}
    assert {(r["method"], r["steps"]) for r in results if r["sampler"]} == \
        {("direct", 1), *((s, k) for s in ("origin", "improved") for k in (1, 4))}

    bad = [r for r in results if r["key"] == "p1_mismatch"]
    assert bad and all(r["status"] == "failed" and "differ in size" in r["reason"] for r in bad)
    good = [r for r in results if r["key"] != "p1_mismatch"]
    assert all(r["status"] == "ok" and r["reason"] is None for r in good)
    assert all(0 < r["ssim"] <= 1 and r["megapixels"] == pytest.approx(0.004096) and r["seconds"] >= 0 for r in good)

    pairs = {p["key"]: p for p in validation_pairs(gaussian_dataset, settings, limit=4)}
    by_cell = {(r["key"], r["method"], r["steps"]): r for r in good}
    for key in (k for k in pairs if k != "p1_mismatch"):
        noisy_psnr = psnr(pairs[key]["clean"], pairs[key]["noisy"])
        assert by_cell[key, "noisy", None]["psnr"] == pytest.approx(noisy_psnr, abs=1e-9)
        for method in classic[1:]:
            assert by_cell[key, method, None]["psnr"] > noisy_psnr + 1.0, (key, method)
        assert np.isfinite(by_cell[key, "improved", 4]["psnr"])

    summary = fs.cat_file(join(root, "summary.md")).decode()
    assert "| method | K |" in summary and f"models:/{name}/{version}" in summary and f"version {version}" in summary
    assert "## Best K per sampler" in summary and "p1_mismatch" in summary and "4 of 5" in summary
    for plot in ("psnr_vs_steps.png", "psnr_vs_speed.png", "examples.png"):
        assert decode_png_float(fs.cat_file(join(root, plot))).shape[2] == 3

    run_id = re.search(r"MLflow run (\w+)", proc.stdout).group(1)
    client = mlflow.MlflowClient(settings.mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.tags["model_name"] == name and run.data.tags["model_version"] == version
    assert run.data.tags["dataset_uri"] == gaussian_dataset and len(run.data.tags["dataset_hash"]) == 64
    noisy_mean = np.mean([by_cell[k, "noisy", None]["psnr"] for k in pairs if k != "p1_mismatch"])
    assert run.data.metrics["eval_psnr_noisy"] == pytest.approx(noisy_mean, abs=1e-6)
    assert {"eval_psnr_improved", "eval_psnr_improved_k4", "eval_best_k_origin"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.parquet", "summary.md", "psnr_vs_steps.png", "examples.png", "results.json"} <= artifacts
    assert client.get_model_version(name, version).tags["eval_run_id"] == run_id


@pytest.mark.stack
def test_local_run_keeps_going_past_a_failing_method(settings, gaussian_dataset, tmp_path, monkeypatch):
    """A method that raises on one image fails that cell only; --local shares the per-cell code."""
    pairs = [p for p in validation_pairs(gaussian_dataset, settings, limit=4, crop=48) if p["key"] != "p1_mismatch"]
    brightest = max(pairs, key=lambda p: p["noisy"].mean())
    threshold = np.mean(sorted(p["noisy"].mean() for p in pairs)[-2:])

    def picky(noisy):
        if noisy.mean() > threshold:
            raise ValueError("too bright for this method")
        return noisy

    monkeypatch.setitem(baselines.CLASSIC_METHODS, "picky", picky)
    config = ev.EvalConfig.of(dataset=gaussian_dataset, methods=("noisy", "picky", "tv"), limit=4, crop=48,
                              report=str(tmp_path / "report"), experiment="tests-evaluate", local=True)
    lines = []
    out = ev.evaluate(config, settings, log=lines.append)

    rows = out["results"].to_pylist()
    assert len(rows) == 4 * 3
    failed = {(r["key"], r["method"]): r["reason"] for r in rows if r["status"] == "failed"}
    assert failed.pop((brightest["key"], "picky")) == "ValueError: too bright for this method"
    assert sorted(failed) == [("p1_mismatch", m) for m in ("noisy", "picky", "tv")]  # its sides differ in size
    assert all(r["psnr"] > 0 for r in rows if r["status"] == "ok")
    assert any("picky: 4/4 cells, 2 failed" in line for line in lines)
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == ["examples.png", "psnr_vs_speed.png", "results.parquet", "summary.md"]
    assert pq.read_table(tmp_path / "report" / "results.parquet").num_rows == 12
    assert "too bright for this method" in (tmp_path / "report" / "summary.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.stack
def test_dataset_without_noisy_side_is_refused(settings, s3_prefix, tmp_path):
    clean, noisy = _gaussian_pair("camera", 3)
    clean_only = _write_dataset(join(s3_prefix, "clean-only"), [_row("a", clean, noisy), _row("b", clean, None)],
                                settings)
    config = ev.EvalConfig.of(dataset=clean_only, methods=("noisy", "tv"), report=str(tmp_path / "report"),
                              local=True)
    with pytest.raises(DatasetError, match=r"1 row\(s\) of .* have no noisy image; evaluation needs \(clean, noisy\)"):
        ev.evaluate(config, settings, log=lambda line: None)
    assert not (tmp_path / "report").exists()


@pytest.mark.stack
def test_unloadable_model_is_a_one_line_error(settings, s3_prefix, gaussian_dataset):
    uri = "models:/no-such-denoiser@candidate"
    proc = run_job("evaluate.py", gaussian_dataset, "--model", uri, "--methods", "tv,direct",
                   "--report", join(s3_prefix, "never"), timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: cannot resolve models:/no-such-denoiser@candidate")
    assert proc.stderr.count("\n") == 1, proc.stderr
    fs, root = fsspec_for(s3_prefix, settings)
    assert not fs.exists(join(root, "never"))


@pytest.mark.stack
def test_report_survives_an_mlflow_failure(settings, gaussian_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    no_mlflow = settings.model_copy(update={"mlflow_uri": "http://127.0.0.1:9"})  # nothing listens there
    config = ev.EvalConfig.of(dataset=gaussian_dataset, methods=("noisy", "tv"), limit=1, crop=None,
                              report=str(tmp_path / "report"), local=True)
    with pytest.raises(ev.EvaluationError, match="report written to .*, but logging to MLflow at http://127.0.0.1:9"):
        ev.evaluate(config, no_mlflow, log=lambda line: None)
    assert pq.read_table(tmp_path / "report" / "results.parquet").num_rows == 2
    assert "MLflow logging failed" in (tmp_path / "report" / "summary.md").read_text()
