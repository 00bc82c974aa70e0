"""The spine check end to end on the local stack, verified through s3fs and MlflowClient."""

from __future__ import annotations

import uuid

import pytest

from pipeline.storage import s3fs_filesystem
from tests.conftest import run_job


@pytest.mark.stack
def test_spine_writes_data_checkpoints_and_metrics(settings):
    import mlflow

    name = f"test-{uuid.uuid4().hex[:8]}"
    experiment = f"smoke-test-{name}"
    proc = run_job("smoke.py", "--prefix", f"tests/smoke/{name}", "--experiment", experiment, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlflow run: http://" in proc.stdout and f"s3://{settings.bucket}/tests/smoke/{name}" in proc.stdout

    fs = s3fs_filesystem(settings)
    root = f"{settings.bucket}/tests/smoke/{name}"
    assert [p for p in fs.find(f"{root}/data") if p.endswith(".parquet")]
    checkpoints = {p.split("/")[-2] for p in fs.find(f"{root}/checkpoints") if p.endswith("model.pt")}
    assert len(checkpoints) == 2          # one per epoch

    client = mlflow.MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["epochs"] == "2" and run.data.params["workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)) >= 8
    assert history[-1].value < history[0].value     # it learned y = 3x + 1
