"""The MLflow UI (headless Chromium) opens a project experiment in the model-training view.

MLflow 3.17's UI picks an experiment's view from the sidebar's GenAI / Model training switch (kept
in the browser, GenAI in a fresh one) or from a ``workflowType`` query parameter, not from the
``mlflow.experimentKind`` tag the project sets. So the project's links carry the parameter
(``tracking.ui_url``), and the control case, the bare link to the same tagged experiment, still
shows the GenAI overview: if it stops doing so, the UI follows the tag and the parameter can go.
Chromium renders each page with a fresh profile and dumps its DOM (``make chromium`` installs it).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from pipeline.tracking import open_training_run, training_datasets, ui_url

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.stack,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM}; `make chromium` installs it")]


def rendered(url: str, *, budget_ms: int = 15000) -> tuple[str, str]:
    """(page title, DOM) of ``url`` once the app has rendered, in a fresh browser profile."""
    for attempt in range(2):  # a busy machine may need a second, longer look
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}",
                                   f"--virtual-time-budget={budget_ms * (attempt + 1)}", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        title = re.search(r"<title>([^<]*)</title>", proc.stdout)
        if title and " - Experiment " in title.group(1):
            return title.group(1), proc.stdout
    pytest.fail(f"the MLflow UI did not render {url}: title {title and title.group(1)!r}")


@pytest.fixture(scope="module")
def training_run(settings):
    """A finished run in a new experiment, both made the way jobs/train.py makes them."""
    import mlflow

    experiment, name = f"tests-ui-{uuid.uuid4().hex[:8]}", "ui-test-run"
    dataset = settings.uri("tests", "ui", "demo")
    run_id, _, _ = open_training_run(settings.mlflow_uri, experiment=experiment, run_name=name,
                                     location=settings.uri("tests", "ui", "checkpoints", name), params={"lr": 0.001},
                                     tags={}, datasets=training_datasets(dataset, {"dataset_hash": "ab" * 32}))
    client = mlflow.MlflowClient(settings.mlflow_uri)
    client.log_metric(run_id, "val_psnr", 28.5, step=1)
    client.set_terminated(run_id)
    experiment_id = client.get_run(run_id).info.experiment_id
    yield experiment_id, name
    client.delete_experiment(experiment_id)


def test_a_project_link_opens_the_experiment_in_the_model_training_view(settings, training_run):
    experiment_id, run_name = training_run
    title, dom = rendered(ui_url(settings.mlflow_uri, experiment_id))
    assert title == f"Runs - Experiment {experiment_id} - MLflow"
    assert 'data-testid="sort-header-Run Name"' in dom and run_name in dom  # the runs table, with our run
    assert "demo/train (abababababababab)" in dom  # and its training dataset (mlflow.log_input)


def test_the_bare_link_opens_the_genai_overview_so_the_link_picks_the_view(settings, training_run):
    experiment_id, run_name = training_run
    title, dom = rendered(f"{settings.mlflow_uri.rstrip('/')}/#/experiments/{experiment_id}")
    assert title == f"Overview - Experiment {experiment_id} - MLflow", (
        "the UI now opens a custom_model_development experiment by its tag: tracking.UI_VIEW can go")
    assert run_name not in dom
