"""Where the pipeline's services live: one typed object, read once at the edge.

Values come from (highest first) explicit overrides, environment variables, then an
optional YAML file named by ``DENOISE_SETTINGS``. Keys, tokens and passwords are ``SecretStr``
so they never appear in a repr, a log line or an MLflow param; workers get them inside the
pickled settings, never through Ray's runtime_env (which the dashboard shows).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

from pipeline.errors import PipelineError, validation_problems


class SettingsError(PipelineError, ValueError):
    """A bad or missing setting; the message names the variable and how to fix it."""


# setting -> environment variables that can carry it, first one wins
ENV_VARS: dict[str, tuple[str, ...]] = {
    "s3_endpoint": ("DENOISE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_region": ("DENOISE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    "s3_access_key": ("DENOISE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "s3_secret_key": ("DENOISE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    "s3_session_token": ("DENOISE_S3_SESSION_TOKEN", "AWS_SESSION_TOKEN"),
    "bucket": ("DENOISE_BUCKET",),
    "mlflow_uri": ("DENOISE_MLFLOW_URI", "MLFLOW_TRACKING_URI"),
    "mlflow_username": ("MLFLOW_TRACKING_USERNAME",),
    "mlflow_password": ("MLFLOW_TRACKING_PASSWORD",),
    "mlflow_token": ("MLFLOW_TRACKING_TOKEN",),
    "mlflow_insecure_tls": ("MLFLOW_TRACKING_INSECURE_TLS",),
    "mlflow_server_cert_path": ("MLFLOW_TRACKING_SERVER_CERT_PATH",),
    "mlflow_client_cert_path": ("MLFLOW_TRACKING_CLIENT_CERT_PATH",),
    "ray_address": ("DENOISE_RAY_ADDRESS", "RAY_ADDRESS"),
}
SETTINGS_FILE_VAR = "DENOISE_SETTINGS"
# settings the MLflow client reads from its environment (auth and TLS) -> the variable it reads
MLFLOW_CLIENT_VARS = {name: variables[0] for name, variables in ENV_VARS.items()
                      if name.startswith("mlflow_") and name != "mlflow_uri"}
# what MLflow takes as a tracking URI besides a local path: file stores, HTTP servers, Databricks, SQLAlchemy
# databases (``dialect+driver://``)
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc", "sqlite", "postgresql", "mysql",
                  "mssql")


class Settings(BaseModel):
    """Endpoints and credentials of the object store, MLflow and Ray."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3_endpoint: str = Field("http://127.0.0.1:8333", description="S3 endpoint URL, http(s)://host:port")
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_session_token: SecretStr | None = Field(None, description="temporary credentials' session token")
    bucket: str = Field("denoise", description="bucket for datasets, checkpoints and outputs")
    mlflow_uri: str = "http://127.0.0.1:5000"
    mlflow_username: str | None = None
    mlflow_password: SecretStr | None = None
    mlflow_token: SecretStr | None = None
    mlflow_insecure_tls: bool | None = None
    mlflow_server_cert_path: str | None = None
    mlflow_client_cert_path: str | None = None
    ray_address: str | None = Field(None, description="ray://, host:port or 'auto'; None starts a local Ray")

    @field_validator("s3_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"must be an http(s)://host[:port] URL, got {value!r}")
        return _checked_port(value)

    @field_validator("mlflow_uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        """What MLflow accepts: a server, ``databricks[://profile]``, a database, ``file:`` or a plain path."""
        if not value.strip() or value != value.strip():
            raise ValueError(f"not a tracking URI: {value!r}")
        if re.match(r"[\w.-]+:\d+(/|$)", value):  # urlparse reads "127.0.0.1:5000" as a path
            raise ValueError(f"{value!r} has no scheme: a tracking server is http(s)://host[:port]")
        url = urlparse(value)
        scheme = url.scheme.split("+", 1)[0]  # postgresql+psycopg2://...
        if scheme in ("http", "https"):
            if not url.hostname:
                raise ValueError(f"an http(s) tracking URI needs a host, http(s)://host[:port], got {value!r}")
            return _checked_port(value)
        if scheme in MLFLOW_SCHEMES or (not scheme and "://" not in value):
            return value  # a database, Databricks, file: or a local folder
        raise ValueError(f"not a tracking URI MLflow accepts: {value!r} (http(s)://host[:port], databricks, "
                         f"sqlite:///mlflow.db or another database URL, file:/path or a folder)")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not (3 <= len(value) <= 63) or not value.replace("-", "").replace(".", "").isalnum() \
                or value != value.lower():
            raise ValueError(f"not a valid S3 bucket name: {value!r} (3-63 lowercase letters, digits, '-', '.')")
        return value

    @field_validator("mlflow_server_cert_path")
    @classmethod
    def _one_way_to_trust_mlflow(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("mlflow_insecure_tls"):  # MLflow would refuse both at its first call
            raise ValueError("excludes MLFLOW_TRACKING_INSECURE_TLS; set one of them")
        return value

    @field_validator("ray_address")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def s3_scheme(self) -> str:
        return urlparse(self.s3_endpoint).scheme

    @property
    def s3_host(self) -> str:
        """host:port as pyarrow's ``endpoint_override`` wants it."""
        return urlparse(self.s3_endpoint).netloc

    def uri(self, *parts: str) -> str:
        """An ``s3://`` URI in the configured bucket."""
        return "s3://" + "/".join([self.bucket, *(p.strip("/") for p in parts if p)])

    def credentials(self) -> tuple[str | None, str | None]:
        return _plain(self.s3_access_key), _plain(self.s3_secret_key)

    def session_token(self) -> str | None:
        """The session token of temporary keys (STS, SSO), which every S3 client must send with them.

        None without both keys: the token belongs to them, and the default credential chain
        (IRSA, an instance profile) brings its own.
        """
        return _plain(self.s3_session_token) if all(self.credentials()) else None

    def s3_env(self) -> dict[str, str]:
        """Environment that boto-based clients (MLflow's artifact store, Ray workers) read for this store.

        The endpoint goes only to S3 (``AWS_ENDPOINT_URL_S3``, botocore's per-service variable):
        the global ``AWS_ENDPOINT_URL`` would send STS, and so IRSA or an assumed role, there too.
        """
        key, secret = self.credentials()
        env = {"AWS_ENDPOINT_URL_S3": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "AWS_REGION": self.s3_region, "AWS_DEFAULT_REGION": self.s3_region}
        if key and secret:
            env |= {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        if self.session_token():
            env["AWS_SESSION_TOKEN"] = self.session_token()
        return env

    def mlflow_env(self) -> dict[str, str]:
        """The MLflow client's auth and TLS variables, secrets included, for the settings that are set."""
        env = {}
        for name, var in MLFLOW_CLIENT_VARS.items():
            value = getattr(self, name)
            if value is not None:
                env[var] = str(value).lower() if isinstance(value, bool) else _plain(value)
        return env

    def apply_mlflow_env(self) -> None:
        """Set the MLflow client's auth variables in this process (a Ray worker has only the pickled settings).

        Call it before the first MLflow call of a process that did not start with them, such as
        Ray Train's rank 0; an authenticated server answers 401 without them.
        """
        os.environ.update(self.mlflow_env())


def _plain(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _checked_port(value: str) -> str:
    try:
        urlparse(value).port
    except ValueError as exc:
        raise ValueError(f"bad port in {value!r}: {exc}") from None
    return value.rstrip("/")


def read_yaml_mapping(path: str | os.PathLike, *, what: str, error: type[PipelineError], hint: str = "") -> dict:
    """A YAML file that must hold a mapping; every way it can fail is one ``error`` line naming the file."""
    file = Path(path)
    if not file.is_file():
        raise error(f"{what} {file} does not exist{hint}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {file} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {file} must hold a mapping of key: value")
    return data


def _from_file(path: str | os.PathLike) -> dict[str, Any]:
    return read_yaml_mapping(path, what="settings file", error=SettingsError,
                             hint=f" (set {SETTINGS_FILE_VAR} to an existing YAML file)")


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    found = {}
    for name, variables in ENV_VARS.items():
        for var in variables:
            if environ.get(var):
                found[name] = environ[var]
                break
    return found


def load_settings(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build and validate the settings once; every problem becomes one readable line."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(SETTINGS_FILE_VAR)
    values = _from_file(path) if path else {}
    values |= _from_env(environ)
    values |= {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        hints = {name: f" (env {' or '.join(names)})" for name, names in ENV_VARS.items()}
        raise SettingsError("invalid settings: " + validation_problems(exc, hints=hints, show_input=False)) \
            from None
