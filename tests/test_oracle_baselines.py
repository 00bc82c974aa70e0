"""Classic methods given the true noise level, and the standard errors of the evaluation summary."""

import math

import numpy as np
import pytest

from pipeline import baselines, report
from pipeline import evaluate as ev
from pipeline.demo_data import demo_image
from pipeline.images import encode_png, to_float, to_uint8
from pipeline.metrics import psnr


def gaussian_pair(sigma: float, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    clean = to_float(demo_image("astronaut", 96))[:size, :size]
    rng = np.random.default_rng(0)
    return clean, np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 1).astype(np.float32)


def test_true_sigma_is_the_std_of_the_noise():
    clean, noisy = gaussian_pair(0.05)
    assert baselines.true_sigma(clean, noisy) == pytest.approx(np.std(noisy - clean))
    assert baselines.true_sigma(clean, clean) == 0.0


def test_oracle_cells_use_the_true_sigma(monkeypatch):
    clean, noisy = gaussian_pair(0.08)
    seen, real = [], baselines.ORACLE_METHODS["nl_means_oracle"]
    monkeypatch.setitem(baselines.ORACLE_METHODS, "nl_means_oracle",
                        lambda image, sigma: seen.append(sigma) or real(image, sigma))
    item = {"key": "a", "method": "nl_means_oracle", "steps": None, "clean": encode_png(to_uint8(clean)),
            "noisy": encode_png(to_uint8(noisy))}
    row = ev.evaluate_item(item, crop=None, sidd=False)
    assert row["status"] == "ok", row["reason"]
    stored_clean, stored_noisy = to_float(to_uint8(clean)), to_float(to_uint8(noisy))
    assert seen == [pytest.approx(baselines.true_sigma(stored_clean, stored_noisy))]
    assert row["psnr"] > psnr(stored_clean, stored_noisy) + 2
    assert "nl_means_oracle" in ev.EvalConfig.of(dataset="x", methods=("nl_means_oracle", "improved")).methods


def test_summary_has_standard_errors():
    rows = [{"key": k, "method": "tv", "steps": None, "status": "ok", "psnr": p, "ssim": 0.5, "sec_per_mp": 1.0}
            for k, p in zip("abcd", (20.0, 22.0, 24.0, 26.0))]
    (row,) = report.summarize(rows, ["tv"])
    assert row["psnr_se"] == pytest.approx(np.std([20, 22, 24, 26], ddof=1) / 2)
    assert row["ssim_se"] == 0.0
    (single,) = report.summarize(rows[:1], ["tv"])
    assert math.isnan(single["psnr_se"])
    assert "± s.e." in report.summary_markdown([row], facts={}, notes=[], failures=[])


def test_every_spreads_the_selection_over_the_split(settings, tmp_path):
    from tests.test_evaluate import _row, _write_dataset

    clean, noisy = gaussian_pair(0.05, size=16)
    rows = [_row(f"{photo}_b{n}", to_uint8(clean), to_uint8(noisy)) for photo in "abc" for n in range(4)]
    uri = _write_dataset(str(tmp_path / "ds"), rows, settings)
    picked = ev.select_pairs(uri, settings, every=4)
    assert picked.keys == ("a_b0", "b_b0", "c_b0") and picked.limited
    assert ev.select_pairs(uri, settings, every=4, limit=2).keys == ("a_b0", "b_b0")
    assert len(ev.select_pairs(uri, settings).keys) == 12
