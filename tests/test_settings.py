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
