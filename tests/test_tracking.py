"""pipeline.tracking's MLflow conventions: model-training experiments, ``mlflow.source.*`` tags and
datasets as run inputs. The rules alone; experiments in a real MLflow store (sqlite, in this
process); and on the local stack (marked ``stack``) a training run as the train job opens it, then
reopens it on resume."""

from __future__ import annotations

import uuid

import pytest

from pipeline import tracking, version
from pipeline.shards import SCHEMA
from pipeline.tracking import (KIND_TAG, MODEL_TRAINING, ensure_experiment, mlflow_dataset, open_training_run,
                               source_tags, training_datasets, ui_url)

HASH = "0123456789abcdef" * 4  # a dataset_hash: 64 hex characters


# ---------------------------------------------------------------- the rules


def test_source_tags_name_the_job_its_type_and_the_commit():
    tags = source_tags("jobs/evaluate.py")
    assert tags["mlflow.source.name"] == "jobs/evaluate.py" and tags["mlflow.source.type"] == "JOB"
    commit = version.code_version()["git_commit"]
    assert tags.get("mlflow.source.git.commit") == commit
    assert all(tags.values())  # unknown ones are left out, not logged empty


def test_the_repository_url_loses_its_credentials_and_a_detached_head_has_no_branch(monkeypatch):
    answers = {("config", "--get", "remote.origin.url"): "https://ci:s3cret@git.example.com/team/denoise.git",
               ("rev-parse", "--abbrev-ref", "HEAD"): "HEAD", ("rev-parse", "HEAD"): "c0ffee"}
    monkeypatch.setattr(version, "_git", lambda *args: answers.get(args))
    tags = source_tags("jobs/train.py")
    assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/team/denoise.git"
    assert tags["mlflow.source.git.commit"] == "c0ffee" and "mlflow.source.git.branch" not in tags
    answers[("rev-parse", "--abbrev-ref", "HEAD")] = "main"
    answers[("config", "--get", "remote.origin.url")] = "git@git.example.com:team/denoise.git"  # no secret in it
    assert source_tags("jobs/train.py")["mlflow.source.git.branch"] == "main"
    assert source_tags("jobs/train.py")["mlflow.source.git.repoURL"] == "git@git.example.com:team/denoise.git"


def test_a_split_is_an_mlflow_dataset_named_by_folder_and_split_with_the_hash_as_digest():
    dataset = mlflow_dataset("s3://denoise/datasets/demo/", split="val", digest=HASH)
    assert (dataset.name, dataset.digest) == ("demo/val", HASH[:tracking.DIGEST_CHARS])
    assert dataset.source.to_dict() == {"uri": "s3://denoise/datasets/demo/val"}
    assert dataset.to_dict()["source_type"] == "s3"
    assert [column.name for column in dataset.schema.inputs] == SCHEMA.names
    assert mlflow_dataset("s3://denoise/datasets/demo", split="val", digest=None).digest  # MLflow's own then
    inputs = training_datasets("s3://denoise/datasets/demo", {"dataset_hash": HASH})
    assert {context: d.name for context, d in inputs.items()} == {"training": "demo/train", "validation": "demo/val"}


def test_links_open_the_model_training_view():
    assert ui_url("http://mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7?workflowType=machine_learning"
    assert ui_url("http://mlflow:5000", "7", "abc") == \
        "http://mlflow:5000/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_experiments_are_created_for_model_training_and_a_chosen_kind_stays(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = ensure_experiment(client, "fresh")
    assert client.get_experiment(created).tags[KIND_TAG] == MODEL_TRAINING
    assert ensure_experiment(client, "fresh") == created
    untagged = client.create_experiment("made-elsewhere")
    assert ensure_experiment(client, "made-elsewhere") == untagged
    assert client.get_experiment(untagged).tags[KIND_TAG] == MODEL_TRAINING
    chosen = client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    ensure_experiment(client, "chosen")
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"


# ---------------------------------------------------------------- on the stack


@pytest.mark.stack
def test_a_training_run_has_source_tags_and_its_datasets_and_a_resume_adds_no_second_input(settings):
    import mlflow

    experiment, name = f"tests-tracking-{uuid.uuid4().hex[:8]}", "tracking-test"
    dataset = settings.uri("tests", "tracking", "demo")
    location = settings.uri("tests", "tracking", "checkpoints", name)
    client = mlflow.MlflowClient(settings.mlflow_uri)
    opened = [open_training_run(settings.mlflow_uri, experiment=experiment, run_name=name, location=location,
                                params={"dataset_hash": HASH}, tags={"dataset": dataset},
                                datasets=training_datasets(dataset, {"dataset_hash": HASH}))
              for _ in range(2)]
    try:
        (run_id, resumed, _), (again, resumed_again, changed) = opened
        assert (resumed, again, resumed_again, changed) == (False, run_id, True, [])
        run = client.get_run(run_id)
        assert client.get_experiment(run.info.experiment_id).tags[KIND_TAG] == MODEL_TRAINING
        assert {k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.")} == source_tags("jobs/train.py")
        assert run.data.params["dataset_hash"] == HASH  # kept beside the inputs: promotion compares it
        inputs = sorted((i.dataset.name, i.dataset.digest, i.dataset.source, [(t.key, t.value) for t in i.tags])
                        for i in run.inputs.dataset_inputs)
        assert inputs == [
            ("demo/train", HASH[:16], f'{{"uri": "{dataset}/train"}}', [("mlflow.data.context", "training")]),
            ("demo/val", HASH[:16], f'{{"uri": "{dataset}/val"}}', [("mlflow.data.context", "validation")])]
    finally:
        client.delete_experiment(client.get_experiment_by_name(experiment).experiment_id)
