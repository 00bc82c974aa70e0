"""What init_ray hands Ray: the workers' env (no secret, no global endpoint, Ray's noise off), agreement with
a submitted job's own runtime_env, and how it fails; MLflow credentials reaching rank 0 in the settings."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import ray
from ray.runtime_env.runtime_env import _merge_runtime_env

from pipeline import cluster
from pipeline.errors import PipelineError, TransientError
from pipeline.settings import load_settings
from tests.conftest import ROOT

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
           "AWS_SESSION_TOKEN": "FwoGZXIvtoken", "MLFLOW_TRACKING_USERNAME": "ci",
           "MLFLOW_TRACKING_PASSWORD": "pa55word", "MLFLOW_TRACKING_TOKEN": "tok-123"}


@pytest.fixture
def settings():
    return load_settings(environ={**SECRETS, "DENOISE_S3_ENDPOINT": "http://s3.example:8333",
                                  "MLFLOW_TRACKING_URI": "https://mlflow.example"})


@pytest.fixture
def ray_init(monkeypatch):
    """ray.init replaced by a recorder; ``failures`` are raised by the first calls, in order."""
    calls, failures = [], []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    for name in (cluster.VERBOSE_ENV, cluster.JOB_CONFIG_ENV, *cluster.QUIET_ENV, *cluster.RAY_DEFAULT_ENV):
        monkeypatch.delenv(name, raising=False)
    return calls, failures


def test_workers_get_where_the_services_are_but_no_secret_and_no_global_endpoint(settings, ray_init):
    calls, _ = ray_init
    cluster.init_ray(settings, attempts=1)
    runtime_env = calls[0]["runtime_env"]
    env = runtime_env["env_vars"]
    shown = json.dumps(runtime_env)  # what the dashboard and the State API show
    for name, value in SECRETS.items():
        assert value not in shown or name == "MLFLOW_TRACKING_USERNAME", name
    assert "AWS_ENDPOINT_URL" not in env  # it would send STS (IRSA, assume-role) to the object store
    assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3.example:8333"
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example"


def test_ray_noise_is_off_unless_verbose(settings, ray_init, monkeypatch):
    calls, _ = ray_init
    cluster.init_ray(settings, attempts=1)
    quiet = calls[-1]["runtime_env"]["env_vars"]
    assert quiet["RAY_DATA_LOG_LEVEL"] == "WARNING" and quiet["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"

    monkeypatch.setenv(cluster.VERBOSE_ENV, "1")
    cluster.init_ray(settings, attempts=1)
    loud = calls[-1]["runtime_env"]["env_vars"]
    assert "RAY_DATA_LOG_LEVEL" not in loud and loud[cluster.VERBOSE_ENV] == "1"

    monkeypatch.delenv(cluster.VERBOSE_ENV)
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")  # asked for explicitly: kept
    cluster.init_ray(settings, attempts=1)
    assert calls[-1]["runtime_env"]["env_vars"]["RAY_DATA_LOG_LEVEL"] == "DEBUG"


def test_inside_a_submitted_job_its_runtime_env_keeps_what_it_sets(settings, ray_init, monkeypatch, capsys):
    """Ray refuses a driver's runtime_env that shares an env var with the job's, even an equal one."""
    calls, _ = ray_init
    job = {"working_dir": "gcs://_ray_pkg_abc.zip",
           "env_vars": {"DENOISE_BUCKET": "denoise", "RAY_DATA_LOG_LEVEL": "INFO"}}
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, json.dumps({"runtime_env": job, "metadata": {}}))
    cluster.init_ray(settings, attempts=1, runtime_env={"working_dir": ".", "env_vars": {"EXTRA": "1"}})
    ours = calls[0]["runtime_env"]
    assert "working_dir" not in ours and "DENOISE_BUCKET" not in ours["env_vars"]
    assert "RAY_DATA_LOG_LEVEL" not in ours["env_vars"] and ours["env_vars"]["EXTRA"] == "1"
    merged = _merge_runtime_env(job, ours)  # what ray.init does with the two: None is a conflict
    assert merged is not None and merged["env_vars"]["RAY_DATA_LOG_LEVEL"] == "INFO"
    assert merged["env_vars"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example"
    warning = capsys.readouterr().err
    assert "RAY_DATA_LOG_LEVEL" in warning and "working_dir" in warning and "DENOISE_BUCKET" not in warning


def test_without_job_fields_leaves_a_plain_run_alone():
    ours = {"env_vars": {"A": "1"}, "pip": ["x"]}
    assert cluster.without_job_fields(ours, {}) == (ours, [])
    assert cluster.job_runtime_env({}) == {} and cluster.job_runtime_env({cluster.JOB_CONFIG_ENV: "not json"}) == {}


def test_a_runtime_env_conflict_is_not_reported_as_cannot_connect(settings, ray_init):
    calls, failures = ray_init
    failures.append(ValueError("Failed to merge the Job's runtime env {'env_vars': {'K': 'secret'}} with a "
                               "ray.init's runtime env {'env_vars': {'K': 'x'}} because of a conflict."))
    with pytest.raises(PipelineError) as err:
        cluster.init_ray(settings.model_copy(update={"ray_address": "10.0.0.1:6379"}), attempts=3)
    message = str(err.value)
    assert "cannot connect" not in message and "runtime_env" in message and "secret" not in message
    assert not err.value.transient and len(calls) == 1  # not retried


def test_an_unreachable_cluster_is_transient_after_the_retries(settings, ray_init):
    calls, failures = ray_init
    failures.extend([ConnectionError("timed out waiting for GCS")] * 3)
    with pytest.raises(TransientError, match="cannot connect to Ray at 10.0.0.1:6379: timed out waiting for GCS"):
        cluster.init_ray(settings.model_copy(update={"ray_address": "10.0.0.1:6379"}), attempts=3)
    assert len(calls) == 3


RANK_ZERO = """
import os, pickle, sys
from mlflow.utils.credentials import get_default_host_creds  # what MLflow's REST store sends

settings = pickle.loads(sys.stdin.buffer.read())  # as Ray hands train_loop_config to rank 0
assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
settings.apply_mlflow_env()
creds = get_default_host_creds(settings.mlflow_uri)
print(creds.username, creds.password, creds.token, creds.ignore_tls_verification, creds.server_cert_path)
"""


def test_mlflow_credentials_reach_a_rank_zero_process_in_the_settings(settings, ray_init, tmp_path):
    """A plain Ray cluster's worker starts without the driver's MLflow variables: 401 without this."""
    calls, _ = ray_init
    cluster.init_ray(settings, attempts=1)
    assert "pa55word" not in json.dumps(calls[0]["runtime_env"]) and "tok-123" not in json.dumps(calls[0])
    with_tls = settings.model_copy(update={"mlflow_server_cert_path": "/etc/ca.pem"})
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    proc = subprocess.run([sys.executable, "-c", RANK_ZERO], input=pickle.dumps(with_tls), capture_output=True,
                          env=clean, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().split() == ["ci", "pa55word", "tok-123", "False", "/etc/ca.pem"]


IN_A_JOB = """
import os, ray
from pipeline.cluster import init_ray
from pipeline.settings import load_settings

init_ray(load_settings(), attempts=1)
names = ("DENOISE_BUCKET", "RAY_DATA_LOG_LEVEL", "AWS_ENDPOINT_URL_S3")
print("worker env:", ray.get(ray.remote(num_cpus=0)(lambda: [os.environ.get(n) for n in names]).remote()))
"""


@pytest.mark.stack
def test_a_job_submitted_with_its_own_env_vars_runs(stack_env):
    """``ray job submit --runtime-env-json`` naming an env var that init_ray sets too: Ray refused the driver's."""
    job_env = {"env_vars": {"DENOISE_BUCKET": stack_env["DENOISE_BUCKET"], "RAY_DATA_LOG_LEVEL": "INFO"}}
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265",
                           "--runtime-env-json", json.dumps(job_env), "--", sys.executable, "-c", IN_A_JOB],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **stack_env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
    assert f"worker env: ['{stack_env['DENOISE_BUCKET']}', 'INFO', '{stack_env['DENOISE_S3_ENDPOINT']}']" in out, \
        out[-3000:]
