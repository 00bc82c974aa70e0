"""Filesystems and storage errors: fast checks on a moto server, auth checks on SeaweedFS."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.fs as pafs
import pytest

from pipeline.settings import load_settings
from pipeline.storage import (StorageError, arrow_filesystem, check_storage, describe_s3_error, fsspec_for,
                              s3_client, s3fs_filesystem, write_atomic)
from tests.conftest import run_job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_settings():
    """A moto S3 server in a subprocess, with one bucket."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    settings = load_settings(environ={"DENOISE_S3_ENDPOINT": url, "AWS_ACCESS_KEY_ID": "testing",
                                      "AWS_SECRET_ACCESS_KEY": "testing", "DENOISE_BUCKET": "unit"})
    import boto3

    boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="unit")
    yield settings
    proc.kill()


def test_both_filesystems_see_the_same_objects(moto_settings):
    fs = s3fs_filesystem(moto_settings)
    write_atomic(fs, "unit/a/b.bin", b"hello")
    assert fs.cat_file("unit/a/b.bin") == b"hello"
    assert [p for p in fs.find("unit/a")] == ["unit/a/b.bin"]   # no temporary object left behind
    info = arrow_filesystem(moto_settings).get_file_info("unit/a/b.bin")
    assert info.type == pafs.FileType.File and info.size == 5
    check_storage(moto_settings)


def test_write_atomic_local_and_uri_resolution(tmp_path, moto_settings):
    fs, path = fsspec_for(str(tmp_path / "out"), moto_settings)
    write_atomic(fs, f"{path}/x/y.txt", b"data")
    assert (tmp_path / "out" / "x" / "y.txt").read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "out" / "x").iterdir()) == ["y.txt"]
    fs, path = fsspec_for("s3://unit/k", moto_settings)
    assert path == "unit/k" and fs.protocol[0] in ("s3", "s3a")


def test_missing_bucket(moto_settings):
    with pytest.raises(StorageError, match="bucket 'nope' does not exist") as err:
        check_storage(moto_settings, "nope")
    assert not err.value.transient  # rerunning will not create it


def test_unreachable_endpoint():
    settings = load_settings(environ={"DENOISE_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                                      "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    with pytest.raises(StorageError) as err:
        check_storage(settings)
    assert "cannot reach S3 endpoint" in str(err.value) and "make up" in str(err.value)
    assert err.value.transient  # schedulers retry it


@pytest.fixture
def recording_endpoint():
    """An S3 endpoint on localhost that answers 404 to everything and keeps each request's headers."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            seen.append({k.lower(): v for k, v in self.headers.items()})
            body = b"" if self.command == "HEAD" else (b"<?xml version='1.0'?><Error><Code>NoSuchBucket</Code>"
                                                        b"<Message>none</Message></Error>")
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("client", ["boto3", "s3fs", "pyarrow"])
def test_every_client_sends_the_session_token(recording_endpoint, client):
    """Temporary credentials without their token are refused by AWS ("InvalidAccessKeyId")."""
    url, seen = recording_endpoint
    settings = load_settings(environ={"DENOISE_S3_ENDPOINT": url, "AWS_ACCESS_KEY_ID": "ASIATEMP",
                                      "AWS_SECRET_ACCESS_KEY": "tempsecret", "AWS_SESSION_TOKEN": "FwoGZXIvtoken"})
    try:
        if client == "boto3":
            s3_client(settings, attempts=1).head_object(Bucket="unit", Key="k")
        elif client == "s3fs":
            s3fs_filesystem(settings).info("unit/k")
        else:
            arrow_filesystem(settings).get_file_info("unit/k")
    except Exception:  # noqa: BLE001 - every client fails its own way on a 404; the request is what counts
        pass
    assert seen, "no request reached the endpoint"
    assert all(h.get("x-amz-security-token") == "FwoGZXIvtoken" for h in seen), seen


def test_expired_temporary_credentials_name_the_token(moto_settings):
    import botocore.exceptions as bce

    exc = bce.ClientError({"Error": {"Code": "ExpiredToken", "Message": "expired"},
                           "ResponseMetadata": {"HTTPStatusCode": 400}}, "HeadBucket")
    message = describe_s3_error(exc, moto_settings)
    assert "temporary credentials" in message and "AWS_SESSION_TOKEN" in message


@pytest.mark.stack
def test_seaweedfs_rejects_wrong_keys(settings):
    wrong = load_settings(environ={"DENOISE_S3_ENDPOINT": settings.s3_endpoint,
                                   "AWS_ACCESS_KEY_ID": settings.credentials()[0],
                                   "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    with pytest.raises(StorageError) as err:
        check_storage(wrong)
    message = str(err.value)
    assert "rejected the credentials" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "not-the-secret" not in message
    check_storage(settings)   # the right keys work


@pytest.mark.stack
@pytest.mark.parametrize("env, expected, status", [
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "rejected the credentials", 2),
    ({"DENOISE_BUCKET": "no-such-bucket"}, "bucket 'no-such-bucket' does not exist", 2),
    ({"DENOISE_S3_ENDPOINT": "http://127.0.0.1:1"}, "cannot reach S3 endpoint", 75),
    ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}, "cannot reach the MLflow tracking server", 75),
])
def test_job_reports_one_line_errors(stack_env, env, expected, status):
    proc = run_job("smoke.py", env=env, timeout=120)
    assert proc.returncode == status
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    assert "Traceback" not in proc.stderr
