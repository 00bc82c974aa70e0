import os

import pytest

from pipeline.settings import Settings, SettingsError, load_settings


def test_defaults_and_env_precedence(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("bucket: from-file\ns3_region: eu-west-1\n")
    env = {"DENOISE_SETTINGS": str(file), "DENOISE_BUCKET": "from-env", "AWS_ENDPOINT_URL": "http://s3.local:9000"}
    s = load_settings(environ=env)
    assert s.bucket == "from-env"              # env beats file
    assert s.s3_region == "eu-west-1"          # file beats default
    assert s.s3_host == "s3.local:9000" and s.s3_scheme == "http"
    assert load_settings(environ=env, bucket="override").bucket == "override"
    assert s.uri("datasets", "/demo/") == "s3://from-env/datasets/demo"


def test_secrets_never_printed():
    s = load_settings(environ={"AWS_ACCESS_KEY_ID": "AKIDVISIBLE", "AWS_SECRET_ACCESS_KEY": "supersecret"})
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "supersecret" not in text and "AKIDVISIBLE" not in text
    assert s.credentials() == ("AKIDVISIBLE", "supersecret")


@pytest.mark.parametrize("env, words", [
    ({"DENOISE_S3_ENDPOINT": "localhost:8333"}, ["s3_endpoint", "DENOISE_S3_ENDPOINT", "http(s)://"]),
    ({"MLFLOW_TRACKING_URI": "http://host:notaport"}, ["mlflow_uri", "bad port"]),
    ({"DENOISE_BUCKET": "Bad_Bucket"}, ["bucket", "not a valid S3 bucket name"]),
    ({"MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem"},
     ["mlflow_server_cert_path (env MLFLOW_TRACKING_SERVER_CERT_PATH): excludes MLFLOW_TRACKING_INSECURE_TLS"]),
])
def test_bad_values_one_line_each(env, words):
    with pytest.raises(SettingsError) as err:
        load_settings(environ=env)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(environ={"DENOISE_SETTINGS": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(bad, environ={})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("buckett: x\n")
    with pytest.raises(SettingsError, match="buckett"):
        load_settings(unknown, environ={})


def test_settings_are_frozen():
    with pytest.raises(Exception):
        Settings().bucket = "other"


def test_temporary_credentials_carry_their_session_token():
    env = {"AWS_ACCESS_KEY_ID": "ASIATEMP", "AWS_SECRET_ACCESS_KEY": "tempsecret", "AWS_SESSION_TOKEN": "FwoGZXIvtoken"}
    s = load_settings(environ=env)
    assert s.session_token() == "FwoGZXIvtoken"
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "FwoGZXIvtoken" not in text
    assert s.s3_env()["AWS_SESSION_TOKEN"] == "FwoGZXIvtoken"
    # a stray token without keys is not sent: the default credential chain (IRSA, a profile) brings its own
    stray = load_settings(environ={"AWS_SESSION_TOKEN": "FwoGZXIvtoken"})
    assert stray.session_token() is None and "AWS_SESSION_TOKEN" not in stray.s3_env()


def test_the_endpoint_is_scoped_to_s3():
    """A global AWS_ENDPOINT_URL would send STS (IRSA, assume-role) to the object store too."""
    env = load_settings(environ={"DENOISE_S3_ENDPOINT": "http://s3.local:9000"}).s3_env()
    assert "AWS_ENDPOINT_URL" not in env
    assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3.local:9000"


def test_mlflow_auth_is_carried_and_applied_but_never_printed(monkeypatch):
    env = {"MLFLOW_TRACKING_URI": "https://mlflow.example", "MLFLOW_TRACKING_USERNAME": "ci",
           "MLFLOW_TRACKING_PASSWORD": "pa55word", "MLFLOW_TRACKING_TOKEN": "tok-123",
           "MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/etc/client.pem"}
    s = load_settings(environ=env)
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "pa55word" not in text and "tok-123" not in text
    assert s.mlflow_env() == {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    monkeypatch.setattr(os, "environ", {})  # this process's environment stays as it was
    s.apply_mlflow_env()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pa55word" and os.environ["MLFLOW_TRACKING_INSECURE_TLS"] == "true"
    assert load_settings(environ={}).mlflow_env() == {}


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example/prefix", "databricks",
                                 "databricks://profile", "file:/srv/mlruns", "file:///srv/mlruns", "./mlruns",
                                 "/srv/mlruns", "sqlite:///mlflow.db", "postgresql+psycopg2://u@db/mlflow"])
def test_tracking_uris_mlflow_accepts(uri):
    assert load_settings(environ={"MLFLOW_TRACKING_URI": uri}).mlflow_uri == uri


@pytest.mark.parametrize("uri, words", [
    ("127.0.0.1:5000", ["has no scheme", "http(s)://host[:port]"]),
    ("localhost:5000", ["has no scheme"]),
    ("http:///no-host", ["needs a host"]),
    ("ftp://files.example/mlruns", ["not a tracking URI MLflow accepts", "sqlite:///"]),
    (" http://padded:5000", ["not a tracking URI"]),
])
def test_malformed_tracking_uris_are_one_clear_line(uri, words):
    with pytest.raises(SettingsError) as err:
        load_settings(environ={"MLFLOW_TRACKING_URI": uri})
    message = str(err.value)
    assert "\n" not in message and message.startswith("invalid settings: mlflow_uri")
    for word in words:
        assert word in message
