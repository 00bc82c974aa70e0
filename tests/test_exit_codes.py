"""The exit-code table (README "Exit codes"), through every job's real main and its exit_on_error wrapper.

No services: unreachable means a closed local port; S3 is a moto server, MLflow a stub that
answers /health and the registry's alias lookup.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pipeline.errors import PipelineError, TransientError, exit_on_error, is_transient, keep_sigterm_handler
from tests.conftest import ROOT
from tests.test_storage import free_port, moto_settings  # noqa: F401  (the moto server fixture)


def job(name: str):
    return importlib.import_module(f"jobs.{name}").main


# ---------------------------------------------------------------- the wrapper, one kind of ending each

@pytest.mark.parametrize("raised, status, last_line", [
    (PipelineError("bad input"), 2, "error: bad input"),
    (TransientError("S3 did not answer"), 75, "error: S3 did not answer"),
    (PipelineError("the lease was lost", transient=True), 75, "error: the lease was lost"),
    (KeyboardInterrupt(), 130, "interrupted"),
    # a service's failure that nothing wrapped: its traceback, then one line
    (ConnectionRefusedError(111, "Connection refused"), 75, "error: ConnectionRefusedError: [Errno 111]"),
    (TimeoutError("timed out"), 75, "error: TimeoutError: timed out"),
])
def test_each_kind_of_failure_has_its_status(raised, status, last_line, capsys):
    @exit_on_error
    def main():
        raise raised

    assert main() == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(last_line), err
    assert ("Traceback" in err) == (not isinstance(raised, (PipelineError, KeyboardInterrupt)))


def test_success_is_0():
    assert exit_on_error(lambda: None)() == 0


def test_a_bug_is_1_with_its_traceback():
    code = "import sys; from pipeline.errors import exit_on_error; sys.exit(exit_on_error(lambda: 1 / 0)())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_sigterm_unwinds_with_143_even_after_ray_replaced_the_handler():
    """``ray.init`` installs ``sys.exit(15)`` for SIGTERM; init_ray keeps the job's handler around it."""
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    @exit_on_error
    def main():
        with keep_sigterm_handler():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)  # e.g. a lease released

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 143 and cleaned and signal.getsignal(signal.SIGTERM) == before


def test_the_kind_survives_pickling():
    """Errors raised in Ray tasks reach the driver pickled."""
    from pipeline.storage import StorageError

    for exc in (StorageError("down", transient=True), TransientError("down"), PipelineError("bad")):
        again = pickle.loads(pickle.dumps(exc))
        assert again.transient == exc.transient and str(again) == str(exc)


def test_what_counts_as_a_service_that_did_not_answer():
    import botocore.exceptions as bce
    import requests
    from mlflow.exceptions import MlflowException, RestException

    def raised_while_handling(cause, exc):
        try:
            try:
                raise cause
            except Exception:
                raise exc  # noqa: B904 - MLflow raises its own exception like this, without "from"
        except Exception as caught:
            return caught

    def client_error(status, code):
        return bce.ClientError({"Error": {"Code": code, "Message": code},
                                "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadBucket")

    assert is_transient(raised_while_handling(requests.exceptions.ConnectionError("refused"),
                                              MlflowException("API request to http://x failed with exception")))
    assert is_transient(bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(urllib.error.URLError(ConnectionRefusedError(111, "refused")))
    assert is_transient(client_error(503, "SlowDown")) and is_transient(client_error(500, "InternalError"))
    assert is_transient(OSError("When reading information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION "
                                "during HeadObject operation: curlCode: 7, Couldn't connect to server"))
    assert not is_transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"}))
    assert not is_transient(client_error(403, "AccessDenied"))
    assert not is_transient(FileNotFoundError("s3://b/k"))
    assert not is_transient(raised_while_handling(ConnectionError("refused"), PipelineError("said permanent")))


# ---------------------------------------------------------------- every job, through its main

@pytest.mark.parametrize("name, argv", [
    ("ingest", []),                                        # SOURCE and DEST missing
    ("train", ["--set", "train.steps=1"]),                 # --config missing
    ("denoise", ["in", "out", "--sampler", "ddim"]),
    ("evaluate", ["s3://denoise/datasets/demo", "--steps", "two"]),
    ("smoke", ["--epochs", "many"]),
])
def test_bad_arguments_are_2(name, argv, capsys):
    with pytest.raises(SystemExit) as usage:
        job(name)(argv)
    assert usage.value.code == 2 and "error:" in capsys.readouterr().err


def test_bad_config_is_2(tmp_path, capsys):
    assert job("train")(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.fixture
def unreachable(monkeypatch):
    """S3 and MLflow on closed local ports, Ray not configured."""
    monkeypatch.setenv("DENOISE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for name in ("DENOISE_BUCKET", "DENOISE_SETTINGS", "RAY_ADDRESS", "DENOISE_RAY_ADDRESS", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name, argv", [
    ("ingest", ["{tmp}", "s3://denoise/datasets/x", "--layout", "sidd"]),
    ("train", ["--config", "configs/demo.yaml"]),
    ("denoise", ["s3://denoise/in", "s3://denoise/out"]),
    ("evaluate", ["s3://denoise/datasets/demo"]),
    ("smoke", []),
])
def test_unreachable_s3_is_75(name, argv, unreachable, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert job(name)([a.format(tmp=tmp_path) for a in argv]) == 75
    err = capsys.readouterr().err
    assert "error: cannot reach S3 endpoint" in err and "Traceback" not in err


class FakeMlflow:
    """/health answers 200; the registry's alias lookup answers ``registry`` (404 = unknown model, 503 = down)."""

    def __init__(self):
        self.registry = 404

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                if handler.path == "/health":
                    status, body = 200, b"OK"
                elif self.registry == 404:
                    status, body = 404, json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST",
                                                    "message": "Registered Model with name=nope not found"}).encode()
                else:
                    status, body = self.registry, b"{}"
                handler.send_response(status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def services(moto_settings, monkeypatch):  # noqa: F811
    """S3 on moto (bucket ``unit``), MLflow faked; its registry answers what the test sets."""
    mlflow = FakeMlflow()
    for name, value in {"DENOISE_S3_ENDPOINT": moto_settings.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "DENOISE_BUCKET": "unit",
                        "MLFLOW_TRACKING_URI": mlflow.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(name, value)
    for name in ("DENOISE_SETTINGS", "RAY_ADDRESS", "DENOISE_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    yield moto_settings, mlflow
    mlflow.server.shutdown()
    mlflow.server.server_close()


def test_unreachable_mlflow_is_75(services, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert job("smoke")([]) == 75
    assert "error: cannot reach the MLflow tracking server" in capsys.readouterr().err


def test_missing_dataset_is_2(services, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert job("train")(["--config", "configs/demo.yaml", "--set", "dataset=s3://unit/datasets/none"]) == 2
    assert "error: no dataset.json at s3://unit/datasets/none" in capsys.readouterr().err
    assert job("evaluate")(["s3://unit/datasets/none", "--model", "s3://unit/ckpt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no dataset.json at s3://unit/datasets/none"), err


def test_unknown_model_is_2_and_a_registry_that_does_not_answer_is_75(services, capsys):
    settings, mlflow = services
    from pipeline.images import encode_png
    from pipeline.storage import s3fs_filesystem

    s3fs_filesystem(settings).pipe("unit/night/in/a.png", encode_png(np.zeros((8, 8, 3), np.uint8)))
    argv = ["s3://unit/night/in", "s3://unit/night/out", "--model", "models:/nope@champion"]
    assert job("denoise")(argv) == 2
    err = capsys.readouterr().err
    assert "error: cannot resolve models:/nope@champion" in err and "not found" in err

    mlflow.registry = 503
    assert job("denoise")(argv) == 75
    err = capsys.readouterr().err
    assert "error: cannot resolve models:/nope@champion" in err, err
