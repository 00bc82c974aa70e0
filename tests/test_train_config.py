"""The training config: schema, overrides, one-line errors before any cluster work; the loop's math."""

import copy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, apply_overrides, load_config, parse_override
from pipeline.model import PRESETS, ModelConfig, UNet
from pipeline.step import update_ema
from pipeline.train import Clock, evaluate, lr_factor, rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "dataset: s3://denoise/datasets/x\ntrain: {steps: 10}\n"


@pytest.mark.parametrize("name", ["demo.yaml", "cpu.yaml", "sidd.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(ROOT / "configs" / name)
    assert config.train.steps and config.checkpoint.every_steps % config.validation.every_steps == 0
    if name == "sidd.yaml":
        assert config.scaling.use_gpu and config.scaling.torch_backend == "nccl" and config.model.preset == "base"
    else:
        assert config.scaling.torch_backend == "gloo" and config.model.preset == "tiny"


def test_training_defaults_to_fp32(tmp_path):
    """bf16 autocast measured slower than fp32 at 16 patches per GPU (docs/training.md), so it is opt-in."""
    assert load_config(write(tmp_path, MINIMAL)).train.bf16 is False


def test_overrides_are_dotted_yaml_scalars(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["optimizer.lr=3e-4", "scaling.num_workers=2",
                                                    "train.bf16=true", "model.width=8", "validation.limit=null",
                                                    "scaling.resources_per_worker={CPU: 0.5}"])
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.scaling.num_workers == 2 and config.train.bf16 is True and config.validation.limit is None
    assert config.model.unet_config().width == 8 and config.scaling.resources_per_worker == {"CPU": 0.5}
    blocks = load_config(write(tmp_path, MINIMAL), ["model.output_norm=false", "model.channel_attention=sigmoid"])
    assert blocks.model.unet_config() == ModelConfig(**{**PRESETS["tiny"].to_dict(), "output_norm": False,
                                                        "channel_attention": "sigmoid"})
    assert load_config(write(tmp_path, MINIMAL)).model.unet_config() == PRESETS["tiny"]
    with pytest.raises(ConfigError, match="model.time_conditioning"):
        load_config(write(tmp_path, MINIMAL), ["model.time_conditioning=film"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    tree = {"a": {"b": 1}}
    assert apply_overrides(tree, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}} and tree == {"a": {"b": 1}}
    flat = config.flat()
    assert flat["optimizer.lr"] == pytest.approx(3e-4) and flat["scaling.resources_per_worker"] == {"CPU": 0.5}


@pytest.mark.parametrize("text, overrides, message", [
    (MINIMAL + "optimiser: {lr: 1}\n", [], r"optimiser: unknown key"),
    (MINIMAL, ["optimizer.lrate=1"], r"optimizer.lrate: unknown key"),
    (MINIMAL, ["optimizer.lr=fast"], r"optimizer.lr: Input should be a valid number.*'fast'"),
    (MINIMAL, ["scaling.num_workers=0"], r"scaling.num_workers: .*greater than or equal to 1"),
    (MINIMAL, ["model.preset=huge"], r"model.preset: .*'tiny', 'tiny-res', 'base' or 'base-res'"),
    (MINIMAL, ["validation.sampler=ddim"], r"validation.sampler"),
    (MINIMAL, ["train.epochs=2"], r"exactly one of train.steps and train.epochs"),
    (MINIMAL, ["checkpoint.every_steps=150"], r"multiple of validation.every_steps"),
    (MINIMAL, ["scaling.backend=nccl"], r"nccl needs scaling.use_gpu"),
    (MINIMAL, ["train.steps.x=1"], r"train.steps is a value, not a section"),
    (MINIMAL, ["novalue"], r"expected KEY=VALUE"),
    (MINIMAL, ["run_name=has space"], r"run_name: String should match pattern"),
    ("train: {steps: 10}\n", [], r"dataset: required"),
    ("- a\n- b\n", [], r"must hold a mapping"),
    ("a: [\n", [], r"not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_job_reports_config_errors_before_any_cluster_work(tmp_path):
    """Unreachable Ray, S3 and MLflow: a config error must still be the (fast) answer."""
    env = {"RAY_ADDRESS": "127.0.0.1:1", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
           "DENOISE_S3_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    config = write(tmp_path, MINIMAL)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config),
                           "--set", "optimizer.warmup=5", "--set", "train.batch_size=big"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config"), proc.stderr
    assert "optimizer.warmup: unknown key" in lines[0] and "train.batch_size: Input should be" in lines[0]
    assert time.monotonic() - started < 60
    help_text = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=120).stdout
    assert "--set KEY=VALUE" in help_text and "--promote" in help_text and "ray job submit" in help_text


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[110] == pytest.approx(0.1) and lr_factor(500, warmup=10, total=110, min_ratio=0.1) == pytest.approx(0.1)


def test_ema_tracks_the_weights_early_and_averages_late():
    torch.manual_seed(0)
    model = UNet(width=8, channel_mults=(1, 2))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, model, decay=0.999, step=0)  # warm-up decay 1/10: mostly the new weights
    gap = [(m - e).abs().max().item() for m, e in zip(model.parameters(), ema.parameters())]
    assert max(gap) == pytest.approx(0.1, abs=1e-5)
    update_ema(ema, model, decay=0.5, step=10_000)
    gap = [(m - e).abs().max().item() for m, e in zip(model.parameters(), ema.parameters())]
    assert max(gap) == pytest.approx(0.05, abs=1e-5)


def test_rng_state_round_trip():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_evaluate_scores_noisy_input_and_both_samplers():
    rng = np.random.default_rng(0)
    clean = rng.random((24, 20, 3), dtype=np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    identity = UNet(width=8, channel_mults=(1, 2))  # zero-initialised output conv: returns its input
    scores, strip = evaluate(identity, [{"key": "a", "clean": clean, "noisy": noisy}], T=100, sampler="improved",
                             steps=4)
    assert set(scores) == {f"val_{m}{s}" for m in ("psnr", "ssim") for s in ("", "_direct", "_noisy")}
    assert scores["val_psnr"] == pytest.approx(scores["val_psnr_noisy"], abs=1e-4)
    assert scores["val_psnr_direct"] == pytest.approx(scores["val_psnr_noisy"], abs=1e-4)
    assert strip.shape == (24, 80, 3) and strip.dtype == np.uint8


def test_run_logger_counts_failures_instead_of_raising(monkeypatch):
    from pipeline.tracking import RunLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what start() sets in a worker
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logger = RunLogger("http://127.0.0.1:9", "0" * 32, system_metrics=False, retry_after=0.0)
    logger.start(["train_loss"])
    for step in range(1, 4):
        logger.log({"train_loss": 0.1, "lr": 1e-3}, step)
        logger.flush()
    logger.image(np.zeros((4, 4, 3), np.uint8), "val_strip", 3)
    logger.close()
    assert logger.failures >= 3 and logger.dropped == 7
    assert logger.summary().startswith("MLflow logging failed") and "7 value(s) were not logged" in logger.summary()


def test_clock_counts_waiting_for_data_but_not_validation_pauses():
    clock = Clock(0, samples_per_step=4, steady_after=1)

    def slow_batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    seen = []
    for step, batch in enumerate(clock.waiting(slow_batches()), start=1):
        seen.append(batch)
        clock.stepped(step)
        with clock.paused():
            time.sleep(0.05)
    assert seen == [0, 1, 2]
    assert clock.wait_total >= 0.15
    summary = clock.summary(3)
    # after the steady point only waits and pauses happened, and pauses do not count
    assert 0.5 < summary["steady_data_wait_share"] <= 1.01
    assert summary["steady_samples_per_s"] > 0
    clock.window_rate(3)
    assert 0.0 < clock.window_wait_share() <= 1.01


def test_a_dataset_smaller_than_one_batch_is_refused_in_both_planning_paths(tmp_path):
    """With drop_last such a shard gives empty epochs; whether train.steps or train.epochs is given."""
    from pipeline.train import TrainingError, plan_steps

    card = {"counts": {"train": 3, "val": 1}}  # 3 pairs x 2 crops = 6 patches < one batch of 8
    for budget in ("train.steps=10", "train.epochs=2"):
        config = load_config(write(tmp_path, MINIMAL),
                             [budget, *(["train.steps=null"] if "epochs" in budget else []),
                              "train.batch_size=8", "data.crops_per_image=2"])
        with pytest.raises(TrainingError, match=r"6 patches per epoch are fewer than one batch on every worker "
                                                r"\(8 x 1\); lower train.batch_size"):
            plan_steps(config, card)
    enough = load_config(write(tmp_path, MINIMAL), ["train.batch_size=3", "data.crops_per_image=2"])
    assert plan_steps(enough, card) == 10
    by_epochs = load_config(write(tmp_path, MINIMAL), ["train.steps=null", "train.epochs=2", "train.batch_size=3",
                                                       "data.crops_per_image=2", "scaling.num_workers=2"])
    assert plan_steps(by_epochs, card) == 2 * (6 // (3 * 2))
    assert plan_steps(enough, {}) == 10  # an older card without counts: the loop's own check is left
    with pytest.raises(TrainingError, match="no train count"):
        plan_steps(by_epochs, {})


def test_an_epoch_without_a_batch_fails_instead_of_spinning():
    from pipeline.train import TrainingError, nonempty_epoch

    assert list(nonempty_epoch(iter([1, 2]), rank=0, batch_size=8)) == [1, 2]
    epochs = 0
    with pytest.raises(TrainingError, match=r"rank 1: an epoch of its training shard gave no batch of 8 patches"):
        while epochs < 100:  # the loop's shape: epoch after epoch until the step budget is spent
            epochs += 1
            for _ in nonempty_epoch(iter([]), rank=1, batch_size=8):
                pass
    assert epochs == 1


def test_scores_are_comparable_only_when_measured_the_same_way():
    from pipeline.modelstore import comparability_problem

    base = {"dataset_hash": "abc", "validation.sampler": "improved", "validation.sampler_steps": "10",
            "validation.crop": "128", "validation.limit": "None", "optimizer.lr": "0.001"}
    assert comparability_problem({**base, "optimizer.lr": "0.0003"}, base) is None  # training settings may differ
    assert comparability_problem({**base, "dataset_hash": "xyz", "validation.crop": "256"}, base) == (
        "measured differently (dataset_hash abc -> xyz; validation.crop 128 -> 256)")
    assert comparability_problem({**base, "dataset_hash": "None"}, base) == "dataset_hash not recorded on both runs"
    older = {k: v for k, v in base.items() if k != "validation.limit"}
    assert comparability_problem(base, older) == "validation.limit not recorded on both runs"


def test_job_options_are_the_config_fields(capsys):
    """Defaults, parsing and help of a job's options come from its config model, not restated."""
    import argparse
    import importlib.util

    from pipeline.cli import field_option
    from pipeline.evaluate import EvalConfig

    parser = argparse.ArgumentParser()
    for name in EvalConfig.model_fields:
        field_option(parser, EvalConfig, name, **({"type": int} if name == "limit" else {}))
    args = vars(parser.parse_args(["s3://b/d"]))
    assert EvalConfig.of(**args) == EvalConfig(dataset="s3://b/d")
    assert parser.parse_args(["d", "--gpu", "--limit", "5"]).gpu is True
    help_text = " ".join(parser.format_help().split())
    assert "--limit LIMIT evaluate the first N pairs by key; none for the whole split (default 3)" in help_text
    assert "(default noisy,nl_means" in help_text and "(default 1,2,5,10)" in help_text

    for job, expected in (("ingest.py", ["--val-fraction VAL_FRACTION share of keys hashed to val (default 0.1)",
                                         "--min-size MIN_SIZE shortest side accepted: the training patch size "
                                         "(default 64)"]),
                          ("evaluate.py", ["--actors ACTORS model actors on Ray (default 2)"]),
                          ("train.py", ["--name RUN Ray Train run name; rerunning with it resumes"])):
        spec = importlib.util.spec_from_file_location(f"job_{job[:-3]}", ROOT / "jobs" / job)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert done.value.code == 0 and all(line in out for line in expected), (job, out)


def test_resume_finds_the_newest_complete_checkpoint_folder_in_storage(tmp_path):
    """An upload that finished while Ray could not register it is still a resume point; a partial one is not."""
    import pyarrow.fs as pafs

    from pipeline.settings import Settings
    from pipeline.train import RESUME_FILES, TRAIN_STATE, _resume_point, checkpoint_step, stored_checkpoint

    fs, run = pafs.LocalFileSystem(), tmp_path / "run"
    assert stored_checkpoint(fs, str(run)) is None                      # no run folder yet
    for step, files in [(4, RESUME_FILES), (8, RESUME_FILES), (12, [f for f in RESUME_FILES if f != TRAIN_STATE])]:
        folder = run / f"step-{step:08d}"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_bytes(b"x")
    (run / "step-latest").mkdir()
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    newest = stored_checkpoint(fs, str(run))
    assert newest == str(run / "step-00000008") and checkpoint_step(newest) == 8

    class Registered:
        def __init__(self, path):
            self.path = path

    settings = Settings()
    chosen, unregistered = _resume_point(Registered(str(run / "step-00000004")), newest, settings)
    assert unregistered and chosen.path == newest
    registered = Registered(str(run / "step-00000008"))
    assert _resume_point(registered, newest, settings) == (registered, False)
    assert _resume_point(None, None, settings) == (None, False)
