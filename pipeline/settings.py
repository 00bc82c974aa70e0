"""Where the pipeline's services live: one typed object, read once at the edge.

Values come from (highest first) explicit overrides, environment variables, then an
optional YAML file named by ``DENOISE_SETTINGS``. Keys are ``SecretStr`` so they never
appear in a repr, a log line or an MLflow param.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from pipeline.errors import PipelineError, validation_problems


class SettingsError(PipelineError, ValueError):
    """A bad or missing setting; the message names the variable and how to fix it."""


# setting -> environment variables that can carry it, first one wins
ENV_VARS: dict[str, tuple[str, ...]] = {
    "s3_endpoint": ("DENOISE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_region": ("DENOISE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    "s3_access_key": ("DENOISE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "s3_secret_key": ("DENOISE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    "bucket": ("DENOISE_BUCKET",),
    "mlflow_uri": ("DENOISE_MLFLOW_URI", "MLFLOW_TRACKING_URI"),
    "ray_address": ("DENOISE_RAY_ADDRESS", "RAY_ADDRESS"),
}
SETTINGS_FILE_VAR = "DENOISE_SETTINGS"


class Settings(BaseModel):
    """Endpoints and credentials of the object store, MLflow and Ray."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3_endpoint: str = Field("http://127.0.0.1:8333", description="S3 endpoint URL, http(s)://host:port")
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    bucket: str = Field("denoise", description="bucket for datasets, checkpoints and outputs")
    mlflow_uri: str = "http://127.0.0.1:5000"
    ray_address: str | None = Field(None, description="ray://, host:port or 'auto'; None starts a local Ray")

    @field_validator("s3_endpoint", "mlflow_uri")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"must be an http(s)://host[:port] URL, got {value!r}")
        try:
            url.port
        except ValueError as exc:
            raise ValueError(f"bad port in {value!r}: {exc}") from None
        return value.rstrip("/")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not (3 <= len(value) <= 63) or not value.replace("-", "").replace(".", "").isalnum() \
                or value != value.lower():
            raise ValueError(f"not a valid S3 bucket name: {value!r} (3-63 lowercase letters, digits, '-', '.')")
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
        key, secret = self.s3_access_key, self.s3_secret_key
        return (key.get_secret_value() if key else None, secret.get_secret_value() if secret else None)

    def s3_env(self) -> dict[str, str]:
        """Environment that boto-based clients (MLflow, Ray workers) read for this store."""
        key, secret = self.credentials()
        env = {"AWS_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "AWS_REGION": self.s3_region, "AWS_DEFAULT_REGION": self.s3_region}
        if key and secret:
            env |= {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        return env


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
