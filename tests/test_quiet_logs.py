"""A short training run on the stack: Ray's own noise stays off the console unless DENOISE_VERBOSE is set."""

import re

import pytest

from tests.conftest import run_job
from tests.test_train_job import tiny_dataset, write_config  # noqa: F401  (the dataset fixture)

pytestmark = pytest.mark.stack

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# glog-style error lines, Ray's C++ error lines ("[2026-01-01 00:00:00,000 E 123 456] core_worker.cc:..."),
# and Python deprecation warnings
RAY_NOISE = re.compile(r"^\[?\S*\s*E\d{4}|core_worker.cc.*E|\[[\d-]+ [\d:,]+ E \d+ \d+\]|DeprecationWarning|deprecated")


def train_briefly(tmp_path, dataset: str, storage: str, name: str, *, verbose: bool) -> list[str]:
    config = write_config(tmp_path, dataset, storage, train={"steps": 16, "log_every": 8},
                          validation={"every_steps": 16, "limit": 1}, checkpoint={"every_steps": 16})
    proc = run_job("train.py", "--config", str(config), "--name", name,
                   env={"DENOISE_VERBOSE": "1" if verbose else ""}, timeout=420)
    lines = ANSI.sub("", proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-60:])
    assert any("step 16/16" in line for line in lines), "\n".join(lines[-60:])
    return lines


def test_ray_noise_is_off_by_default_and_back_with_denoise_verbose(tmp_path, s3_prefix,
                                                                  tiny_dataset):  # noqa: F811
    storage = f"{s3_prefix}/checkpoints"
    quiet = train_briefly(tmp_path, tiny_dataset, storage, "quiet", verbose=False)
    assert [line for line in quiet if RAY_NOISE.search(line)] == []
    assert not any("PreemptionWatcher" in line or "Progress bars disabled" in line for line in quiet)
    assert not any("Execution plan of Dataset" in line for line in quiet)

    loud = train_briefly(tmp_path, tiny_dataset, storage, "loud", verbose=True)
    assert any("(SplitCoordinator" in line and "Execution plan of Dataset" in line for line in loud), \
        "\n".join(loud[-60:])
    assert not any("exclude_resources" in line for line in loud)  # fixed at its cause, not only hidden
