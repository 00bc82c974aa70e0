"""The batch-denoise stages as plain functions on a local folder: no Ray, S3 or MLflow needed."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.archives import Limits, list_sources
from pipeline.images import decode_image, encode_png
from pipeline.infer import (
    Denoise,
    DenoiseConfig,
    DenoiseConfigError,
    Summary,
    expand_source,
    finish_row,
    output_key,
    pixels_of,
    ray_remote_args,
    ray_submission_id,
    unfinished_rows,
)
from pipeline.ledger import StateIndex, item_name, merge_state, read_state_index
from pipeline.metrics import estimate_noise_sigma, psnr, ssim
from pipeline.model import build_model
from pipeline.modelstore import Denoiser
from pipeline.settings import Settings

SETTINGS = Settings()


def photo(height: int, width: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0.2, 0.8, width)[None, :, None] * np.ones((height, 1, 3))
    noisy = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1)
    return np.round(noisy * np.iinfo(dtype).max).astype(dtype)


def actor(model=None, *, T: int = 20, tile: int = 512, steps: int = 4, self_ensemble: bool = False) -> Denoise:
    model = model or build_model("tiny")
    return Denoise(model_uri="test", settings=SETTINGS, sampler="improved", steps=steps, tile=tile, overlap=8,
                   batch_size=2, self_ensemble=self_ensemble, threads=1,
                   denoiser=Denoiser(model=model.eval(), T=T, uri="test"))


def perturbed_model():
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        model.out_conv.weight.normal_(0, 0.01)  # the zero-initialised head makes a fresh UNet the identity
    return model


def expand_all(folder, *, index=StateIndex(), max_pixels=10_000_000, limits=Limits()) -> dict[str, dict]:
    rows = {}
    sources = list_sources(str(folder), SETTINGS)
    prefixes = tuple(s.rel + "/" for s in sources if s.kind == "archive")
    for source in sources:
        row = {"rel": source.rel, "uri": source.uri, "size": source.size}
        for item in expand_source(row, settings=SETTINGS, limits=limits, index=index, max_pixels=max_pixels,
                                  archive_prefixes=prefixes):
            rows[item["key"]] = item
    return rows


def run_items(rows: dict[str, dict], config: DenoiseConfig, denoise: Denoise, run_id: str = "run-1",
              model_version: str = "1", index: StateIndex = StateIndex()) -> list[dict]:
    """What the Ray Data graph does, row by row."""
    out = []
    for row in rows.values():
        batch = {k: np.array([v], dtype=object) for k, v in row.items()}
        batch = denoise(batch)
        row = {k: v[0] for k, v in batch.items()}
        out.append(finish_row(row, settings=SETTINGS, config=config, model_ref=f"models:/m/{model_version}",
                              model_version=model_version, run_id=run_id, index=index))
    return out


def state_index(config: DenoiseConfig, model_version: str = "1") -> StateIndex:
    """What the driver reads before a run of ``config`` with ``models:/m/<model_version>``."""
    return read_state_index(config.output, SETTINGS, recipe=config.recipe_tag(f"models:/m/{model_version}",
                                                                              model_version),
                            limits=config.limits_tag, partition=config.partition)


def merge(config: DenoiseConfig, run_id: str, log=print):
    return merge_state(output=config.output, out_root=config.out_root, partition=config.partition,
                       settings=SETTINGS, run_id=run_id, log=log)


def test_config_is_validated_once_with_readable_errors(tmp_path):
    config = DenoiseConfig.build(input="in", output=str(tmp_path / "out"), date="2024-05-01")
    assert config.input.startswith("/") and config.out_root == str(tmp_path / "out" / "2024-05-01")
    assert config.partition == "2024-05-01" and DenoiseConfig.build(input="a", output="b").partition == "undated"
    for bad, match in [({"date": "2024-13-40"}, "YYYY-MM-DD"), ({"overlap": 600}, "overlap"),
                       ({"output": "/x/in/out", "input": "/x/in"}, "contain one another"),
                       ({"input": "gs://b/x"}, "only s3://"), ({"sampler": "ddim"}, "sampler"),
                       ({"steps": 0}, "steps")]:
        with pytest.raises(DenoiseConfigError, match=match):
            DenoiseConfig.build(**{"input": "/x/a", "output": "/x/b", **bad})


def test_output_keys_mirror_input_keys():
    assert output_key("night1.tar/sub/a.png") == "night1.tar/sub/a.png"
    assert output_key("b.JPG") == "b.JPG.png" and output_key("c.tif") == "c.tif.png"
    with pytest.raises(ValueError):
        output_key("night1.tar/../../x.png")


def test_submission_id_comes_from_the_job_config(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    assert ray_submission_id() == "raysubmit_1"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_submission_id() is None


def test_expand_decodes_good_items_and_names_every_bad_one(tmp_path):
    (tmp_path / "good.png").write_bytes(encode_png(photo(20, 24)))
    (tmp_path / "deep.png").write_bytes(encode_png(photo(10, 12, dtype=np.uint16)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(encode_png(photo(40, 40))[:200])
    (tmp_path / "huge.png").write_bytes(encode_png(photo(120, 120)))
    (tmp_path / "notes.txt").write_text("hello")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("ok/a.png", encode_png(photo(8, 8))), ("../escape.png", encode_png(photo(8, 8)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "n.tar").write_bytes(buffer.getvalue())
    rows = expand_all(tmp_path, max_pixels=10_000)
    status = {k: (r["status"], r["stage"], r["reason"]) for k, r in rows.items()}
    assert status["good.png"][0] == status["deep.png"][0] == status["n.tar/ok/a.png"][0] == "pending"
    assert status["corrupt.png"][:2] == ("failed", "decode") and "corrupt" in status["corrupt.png"][2]
    assert status["zero.jpg"] == ("failed", "decode", "zero-byte file")
    assert status["truncated.png"][:2] == ("failed", "decode") and "truncated" in status["truncated.png"][2]
    assert status["huge.png"] == ("failed", "decode", "too large: 14400 px > limit 10000")
    assert status["notes.txt"][:2] == ("failed", "read")
    assert status["n.tar/../escape.png"][:2] == ("failed", "read") and "'..'" in status["n.tar/../escape.png"][2]
    deep = rows["deep.png"]
    assert (deep["height"], deep["width"], deep["bits"]) == (10, 12, 16)
    assert np.array_equal(pixels_of(deep["pixels"], 10, 12, 16), photo(10, 12, dtype=np.uint16))
    assert rows["good.png"]["checksum"] and not rows["notes.txt"]["checksum"]


def test_identity_model_returns_the_input_tiled_or_whole_in_both_bit_depths():
    # A fresh UNet is the identity (zero-initialised head), so every sampler must return y.
    for dtype in (np.uint8, np.uint16):
        image = photo(70, 90, dtype=dtype)
        for tile in (32, 512):
            out = actor(tile=tile).denoise(image)
            assert out.dtype == dtype and out.shape == image.shape
            assert np.abs(out.astype(np.int64) - image).max() <= 1


def test_tiled_inference_matches_whole_image_inference():
    image = photo(64, 80, seed=3)
    model = perturbed_model()
    whole = actor(model, tile=512).denoise(image)
    tiled = actor(model, tile=48).denoise(image)
    assert not np.array_equal(whole, image)  # the model does something
    assert psnr(whole / 255.0, tiled / 255.0) > 35


def test_self_ensemble_averages_the_turned_outputs_of_the_same_model():
    image = photo(40, 56, seed=4)
    model = perturbed_model()
    plain, ensembled = actor(model).denoise(image), actor(model, self_ensemble=True).denoise(image)
    assert ensembled.shape == image.shape and ensembled.dtype == image.dtype
    assert not np.array_equal(plain, ensembled) and psnr(plain / 255.0, ensembled / 255.0) > 30
    turned = actor(model).denoise(np.ascontiguousarray(np.rot90(image)))
    # One of the eight views by hand: the model run on the turned photo, turned back.
    assert psnr(ensembled / 255.0, np.rot90(turned, -1) / 255.0) > 30
    identity = actor(self_ensemble=True).denoise(image)
    assert np.abs(identity.astype(np.int64) - image).max() <= 1


def test_actor_reports_a_failing_item_and_keeps_going():
    denoise = actor()
    good = photo(8, 8)
    batch = {"key": np.array(["a", "b"], dtype=object), "status": np.array(["pending", "pending"], dtype=object),
             "reason": np.array(["", ""], dtype=object), "stage": np.array(["", ""], dtype=object),
             "retry": np.array([False, False]), "pixels": np.array([good.tobytes(), b"short"], dtype=object),
             "height": np.array([8, 8]), "width": np.array([8, 8]), "bits": np.array([8, 8])}
    out = denoise(batch)
    assert list(out["status"]) == ["pending", "failed"]
    assert out["stage"][1] == "denoise" and out["retry"][1] and "inference failed" in out["reason"][1]
    assert np.array_equal(pixels_of(out["denoised"][0], 8, 8, 8), good)


def test_finish_writes_png_metrics_and_markers_then_merge_builds_the_tables(tmp_path):
    noisy_dir, ref_dir, out_dir = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    noisy_dir.mkdir(), ref_dir.mkdir()
    clean = photo(32, 40, seed=1)
    noise = np.random.default_rng(2).integers(-20, 20, clean.shape)
    noisy = np.clip(clean.astype(int) + noise, 0, 255).astype(np.uint8)
    (noisy_dir / "a.png").write_bytes(encode_png(noisy))
    (ref_dir / "a.png").write_bytes(encode_png(clean))
    (noisy_dir / "b.jpg.png").write_bytes(encode_png(photo(16, 16, dtype=np.uint16)))  # no reference
    (noisy_dir / "zero.png").write_bytes(b"")
    config = DenoiseConfig.build(input=str(noisy_dir), output=str(out_dir), reference=str(ref_dir), date="2024-05-01",
                                 sampler="origin", steps=2)
    results = {r["key"]: r for r in run_items(expand_all(noisy_dir), config, actor(perturbed_model()))}
    assert {k: r["status"] for k, r in results.items()} == {"a.png": "done", "b.jpg.png": "done", "zero.png": "failed"}

    written = decode_image((out_dir / "2024-05-01" / "images" / "a.png").read_bytes())
    assert written.shape == noisy.shape and written.dtype == np.uint8
    a = results["a.png"]
    assert a["psnr_in"] == pytest.approx(psnr(clean / 255.0, noisy / 255.0))
    assert a["psnr_out"] == pytest.approx(psnr(clean / 255.0, written / 255.0))
    assert a["ssim_out"] == pytest.approx(ssim(clean / 255.0, written / 255.0))
    assert a["sigma_out"] == pytest.approx(estimate_noise_sigma(written / 255.0))
    assert decode_image(a["preview"]).shape == (32, 40 * 3 + 8, 3)  # noisy | denoised | reference
    deep = decode_image((out_dir / "2024-05-01" / "images" / "b.jpg.png").read_bytes())
    assert deep.dtype == np.uint16
    assert math.isnan(results["b.jpg.png"]["psnr_in"]) and results["b.jpg.png"]["note"] == "no reference"

    manifest, errors = merge(config, run_id="run-1")
    assert list(manifest["key"]) == ["a.png", "b.jpg.png"]
    assert manifest.loc[0, "output_uri"] == str(out_dir / "2024-05-01" / "images" / "a.png")
    assert manifest.loc[0, "psnr_out"] == pytest.approx(a["psnr_out"])
    assert manifest.loc[1, "psnr_in"] is None or math.isnan(manifest.loc[1, "psnr_in"])
    assert (manifest["model_uri"] == "models:/m/1").all() and (manifest["sampler"] == "origin").all()
    assert list(errors["key"]) == ["zero.png"] and errors.loc[0, "reason"] == "zero-byte file"
    on_disk = pd.read_parquet(out_dir / "2024-05-01" / "manifest.parquet")
    assert list(on_disk["key"]) == ["a.png", "b.jpg.png"]
    assert len(pd.read_parquet(out_dir / "2024-05-01" / "errors.parquet")) == 1

    # The next run skips the done items and the deterministic failure, by key and checksum.
    index = state_index(config)
    assert index.skips(item_name("a.png", results["a.png"]["checksum"]))
    again = expand_all(noisy_dir, index=index)
    assert {k: r["status"] for k, r in again.items()} == {"a.png": "skipped", "b.jpg.png": "skipped",
                                                         "zero.png": "skipped"}
    # A changed file under the same key is new work.
    (noisy_dir / "a.png").write_bytes(encode_png(noisy[::-1].copy()))
    assert expand_all(noisy_dir, index=index)["a.png"]["status"] == "pending"


def test_summary_counts_and_gains():
    summary = Summary(seconds=2.0)
    summary.add({"status": "done", "key": "a", "height": 1000, "width": 1000, "sigma_in": 0.1, "sigma_out": 0.02,
                 "psnr_in": 20.0, "psnr_out": 30.0, "ssim_in": 0.5, "ssim_out": 0.9, "preview": b"x"}, 1)
    summary.add({"status": "done", "key": "b", "height": 1000, "width": 1000, "sigma_in": 0.1, "sigma_out": 0.05,
                 "psnr_in": math.nan, "psnr_out": math.nan, "ssim_in": math.nan, "ssim_out": math.nan,
                 "preview": b"y"}, 1)
    summary.add({"status": "skipped"}, 1)
    summary.add({"status": "failed"}, 1)
    metrics = summary.metrics()
    assert (metrics["items_done"], metrics["items_skipped"], metrics["items_failed"]) == (2, 1, 1)
    assert metrics["mp_per_s"] == pytest.approx(1.0) and metrics["mean_psnr_gain"] == pytest.approx(10.0)
    assert metrics["mean_sigma_reduction"] == pytest.approx(0.065) and summary.previews == [("a", b"x")]
    assert summary.line() == "2 done, 1 skipped, 1 failed, 2.00 MP in 2.0s (1.000 MP/s)"


def tar_of(members: dict[str, bytes]) -> bytes:
    """A tar whose member names are written as raw bytes (``\\udcff`` becomes the byte 0xff)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_member_name_that_is_not_utf8_is_denoised_under_an_escaped_key(tmp_path):
    noisy_dir, out_dir = tmp_path / "in", tmp_path / "out"
    noisy_dir.mkdir()
    (noisy_dir / "n.tar").write_bytes(tar_of({"good.png": encode_png(photo(12, 12)),
                                              "\udcff.png": encode_png(photo(12, 12, seed=1))}))
    assert b"\xff.png" in (noisy_dir / "n.tar").read_bytes()
    config = DenoiseConfig.build(input=str(noisy_dir), output=str(out_dir))
    rows = expand_all(noisy_dir)
    assert set(rows) == {"n.tar/good.png", "n.tar/%FF.png"}
    results = {r["key"]: r for r in run_items(rows, config, actor())}
    assert {k: r["status"] for k, r in results.items()} == {"n.tar/good.png": "done", "n.tar/%FF.png": "done"}
    assert (out_dir / "images" / "n.tar" / "%FF.png").is_file()
    manifest, errors = merge(config, run_id="run-1")
    assert sorted(manifest["key"]) == ["n.tar/%FF.png", "n.tar/good.png"] and errors.empty
    assert "%FF.png" in pd.read_parquet(out_dir / "manifest.parquet")["output_uri"].iloc[0]
    assert {r["status"] for r in expand_all(noisy_dir, index=state_index(config)).values()} == {"skipped"}


def test_any_exception_of_one_item_is_its_error_row_and_the_source_goes_on(tmp_path, monkeypatch):
    import pipeline.infer as infer

    (tmp_path / "n.tar").write_bytes(tar_of({"a.png": encode_png(photo(8, 8)), "exif.png": b"\x89PNG trips it",
                                             "c.png": encode_png(photo(8, 8, seed=2))}))
    real_decode = infer.decode_image

    def decode(data, **kwargs):  # what an EXIF orientation stored as text did to the decoder
        if data == b"\x89PNG trips it":
            raise ValueError("invalid literal for int() with base 10: 'top-left'")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(infer, "decode_image", decode)
    rows = expand_all(tmp_path)
    assert rows["n.tar/exif.png"]["status"] == "failed" and rows["n.tar/exif.png"]["stage"] == "decode"
    assert rows["n.tar/exif.png"]["reason"] == "decode failed: ValueError: invalid literal for int() with base 10: 'top-left'"
    assert rows["n.tar/a.png"]["status"] == rows["n.tar/c.png"]["status"] == "pending"

    def broken_archive(source, settings, limits):
        yield from real_items(source, settings, limits)
        raise RuntimeError("inflate went wrong\nsecond line")

    real_items = infer.iter_items
    monkeypatch.setattr(infer, "iter_items", broken_archive)
    rows = expand_all(tmp_path)
    assert rows["n.tar"]["status"] == "failed" and rows["n.tar"]["reason"] == "read failed: RuntimeError: inflate went wrong"
    assert rows["n.tar/c.png"]["status"] == "pending"  # what came before the failure stays valid


def test_skip_keys_name_the_model_sampler_steps_and_the_limits_of_final_errors(tmp_path):
    noisy_dir, out_dir = tmp_path / "in", tmp_path / "out"
    noisy_dir.mkdir()
    (noisy_dir / "a.png").write_bytes(encode_png(photo(16, 16)))
    (noisy_dir / "big.png").write_bytes(encode_png(photo(40, 40)))
    config = DenoiseConfig.build(input=str(noisy_dir), output=str(out_dir), steps=4, max_megapixels=0.001)
    results = {r["key"]: r for r in run_items(expand_all(noisy_dir, max_pixels=config.max_pixels), config, actor())}
    assert results["a.png"]["status"] == "done" and "too large" in results["big.png"]["reason"]
    _, errors = merge(config, run_id="run-1")
    assert errors.loc[0, "max_megapixels"] == 0.001 and errors.loc[0, "max_image_mb"] == 1024.0

    def statuses(config, model_version="1"):
        rows = expand_all(noisy_dir, index=state_index(config, model_version), max_pixels=config.max_pixels)
        return {k: r["status"] for k, r in rows.items()}

    assert statuses(config) == {"a.png": "skipped", "big.png": "skipped"}
    assert statuses(config, model_version="2")["a.png"] == "pending"  # a new model redoes the item
    assert statuses(config.model_copy(update={"steps": 8}))["a.png"] == "pending"  # and so does another K
    assert statuses(config.model_copy(update={"sampler": "origin"}))["a.png"] == "pending"
    # Raised limits retry the final error (and now it decodes).
    assert statuses(config.model_copy(update={"max_megapixels": 1.0})) == {"a.png": "skipped", "big.png": "pending"}


def test_ray_tasks_and_model_actors_are_retried_a_bounded_number_of_times():
    config = DenoiseConfig.build(input="/x/a", output="/x/b", task_retries=1, gpus_per_worker=0.5)
    tasks, actors = ray_remote_args(config)
    assert tasks["max_retries"] == 1 and actors["max_restarts"] == 1 and actors["max_task_retries"] == 1
    assert actors["num_gpus"] == 0.5 and tasks["memory"] == 1024 << 20
    assert DenoiseConfig.build(input="/x/a", output="/x/b").task_retries == 2


def test_sources_whose_task_died_become_error_rows_retried_next_run(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(encode_png(photo(8, 8)))
    (tmp_path / "in" / "n.tar").write_bytes(tar_of({"x.png": encode_png(photo(8, 8))}))
    config = DenoiseConfig.build(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    sources = list_sources(config.input, SETTINGS)
    rows = unfinished_rows(sources, {"a.png", "n.tar/x.png"}, settings=SETTINGS, config=config, run_id="run-1")
    assert [(r["key"], r["status"]) for r in rows] == [("b.png", "failed")]
    assert "died 3 times" in rows[0]["reason"]
    _, errors = merge(config, run_id="run-1")
    assert list(errors["key"]) == ["b.png"] and errors.loc[0, "retry"] and errors.loc[0, "stage"] == "task"
    assert not state_index(config).final  # not final: the next run tries it again


def test_a_key_is_skipped_only_while_its_record_is_the_png_there_model_rolled_back_or_bytes_restored(
        tmp_path, monkeypatch):
    import pipeline.infer as infer

    noisy_dir, out_dir = tmp_path / "in", tmp_path / "out"
    noisy_dir.mkdir()
    original = encode_png(photo(16, 16))
    (noisy_dir / "a.png").write_bytes(original)
    config = DenoiseConfig.build(input=str(noisy_dir), output=str(out_dir), steps=2)
    models = {"1": actor(), "2": actor(perturbed_model())}  # the identity, and a model that changes pixels
    png, records = out_dir / "images" / "a.png", out_dir / "_state" / "done" / "undated"

    def run(version: str) -> str:
        index = state_index(config, version)
        rows = expand_all(noisy_dir, index=index)
        if rows["a.png"]["status"] == "pending":
            [result] = run_items(rows, config, models[version], model_version=version, index=index)
            assert result["status"] == "done", result["reason"]
        return rows["a.png"]["status"]

    assert [run(v) for v in ("1", "2", "1", "1")] == ["pending", "pending", "pending", "skipped"]
    assert decode_image(png.read_bytes()).tolist() == decode_image(original).tolist()  # v1 is the identity
    manifest, _ = merge(config, run_id="run-1")
    assert list(manifest["model_version"]) == ["1"] and len(list(records.iterdir())) == 1

    # Interrupted after the old record went and before the new PNG: no record, so any model redoes it.
    with monkeypatch.context() as broken:
        broken.setattr(infer, "write_atomic", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
        index = state_index(config, "2")
        [failed] = run_items(expand_all(noisy_dir, index=index), config, models["2"], "run-2", "2", index)
    assert failed["status"] == "failed" and "disk full" in failed["reason"] and not list(records.iterdir())
    assert expand_all(noisy_dir, index=state_index(config, "1"))["a.png"]["status"] == "pending"
    manifest, errors = merge(config, run_id="run-2")
    assert manifest.empty and list(errors["key"]) == ["a.png"] and errors.loc[0, "retry"]
    assert run("2") == "pending" and decode_image(png.read_bytes()).tolist() != decode_image(original).tolist()

    # The same holds for the bytes: A, then B, then A again under one key.
    (noisy_dir / "a.png").write_bytes(encode_png(photo(16, 16, seed=5)))
    assert run("2") == "pending"
    (noisy_dir / "a.png").write_bytes(original)
    assert [run("2"), run("2")] == ["pending", "skipped"]
    manifest, _ = merge(config, run_id="run-3")
    assert list(manifest["model_version"]) == ["2"] and len(list(records.iterdir())) == 1
