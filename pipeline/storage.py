"""Filesystems for one configured S3 endpoint (or a local folder), and whole-object writes.

pyarrow's S3FileSystem ignores ``AWS_ENDPOINT_URL``, so the pyarrow filesystem (for Ray Data
and Ray Train), the s3fs filesystem (for listing and small objects) and the boto3 client (for
conditional writes) are all built here from the same settings: endpoint, region, keys and the
session token of temporary credentials. s3fs instances are not fork-safe: build them inside the task
or actor that uses them, from the (picklable) settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow.fs as pafs

from pipeline.errors import PipelineError, is_transient
from pipeline.settings import Settings


class StorageError(PipelineError):
    """The object store can't be used as configured (transient when it did not answer)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def strip_scheme(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``; a local path becomes absolute."""
    return uri[len("s3://"):].rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())


def s3fs_filesystem(settings: Settings):
    import s3fs

    key, secret = settings.credentials()
    return s3fs.S3FileSystem(
        key=key, secret=secret, token=settings.session_token(), anon=False, skip_instance_cache=True,
        client_kwargs={"endpoint_url": settings.s3_endpoint, "region_name": settings.s3_region},
        config_kwargs={"connect_timeout": 5, "retries": {"max_attempts": 2}},
    )


def arrow_filesystem(settings: Settings) -> pafs.S3FileSystem:
    key, secret = settings.credentials()
    return pafs.S3FileSystem(
        access_key=key, secret_key=secret, session_token=settings.session_token(),
        endpoint_override=settings.s3_host, scheme=settings.s3_scheme, region=settings.s3_region,
        connect_timeout=5, request_timeout=60, allow_bucket_creation=False,
    )


def arrow_fs_for(uri: str, settings: Settings) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and bare path for an ``s3://`` URI or a local path."""
    if is_s3(uri):
        return arrow_filesystem(settings), strip_scheme(uri)
    return pafs.LocalFileSystem(), strip_scheme(uri)


def fsspec_for(uri: str, settings: Settings, *, shared: bool = False):
    """The fsspec filesystem and bare path for an ``s3://`` URI or a local path.

    ``shared=True`` reuses one filesystem per process and store: tasks and actors that
    touch many small objects would otherwise pay for a new S3 client each time. Each Ray
    worker builds its own (never a forked one).
    """
    fs = _shared_filesystem(settings, is_s3(uri)) if shared else _filesystem(settings, is_s3(uri))
    return fs, strip_scheme(uri)


def _filesystem(settings: Settings, s3: bool):
    return s3fs_filesystem(settings) if s3 else fsspec.filesystem("file")


@functools.lru_cache(maxsize=8)
def _shared_filesystem(settings: Settings, s3: bool):
    return _filesystem(settings, s3)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write under a temporary name, then move into place, so readers never see half an object."""
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    if not is_s3_fs(fs):
        os.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def is_s3_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


def describe_s3_error(exc: BaseException, settings: Settings, bucket: str | None = None) -> str:
    """Turn a botocore/aiobotocore failure into one line that says what to fix."""
    import botocore.exceptions as bce

    bucket = bucket or settings.bucket
    where = f"S3 endpoint {settings.s3_endpoint}"
    if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, ConnectionError, OSError)) \
            and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return (f"cannot reach {where} ({type(exc).__name__}); start the local stack with `make up` "
                f"or set DENOISE_S3_ENDPOINT to a reachable endpoint")
    if isinstance(exc, bce.NoCredentialsError):
        return f"no S3 credentials for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    code = ""
    if isinstance(exc, bce.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return (f"{where} rejected the temporary credentials ({code}); refresh them: AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN come together")
    if isinstance(exc, FileNotFoundError) or code in ("404", "NoSuchBucket"):
        fix = "set DENOISE_BUCKET" if bucket == settings.bucket else "fix the s3:// URI that names it"
        return f"bucket '{bucket}' does not exist at {where}; create it or {fix}"
    if isinstance(exc, PermissionError) or code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                     "AccessDenied"):
        return (f"{where} rejected the credentials ({code or 'access denied'}); check AWS_ACCESS_KEY_ID "
                f"and AWS_SECRET_ACCESS_KEY (the local stack writes them to .local/stack.env)")
    return f"{where} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def s3_client(settings: Settings, *, connect_timeout: float = 5, read_timeout: float = 30, attempts: int = 2):
    """A boto3 S3 client for the configured endpoint (for calls s3fs does not offer)."""
    import boto3
    import botocore.config

    key, secret = settings.credentials()
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
        aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=settings.session_token(),
        config=botocore.config.Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                      retries={"max_attempts": attempts}),
    )


def check_storage(settings: Settings, bucket: str | None = None) -> None:
    """Fail fast, with a fix, when the endpoint, the keys or the bucket are wrong."""
    import botocore.exceptions as bce

    client = s3_client(settings, connect_timeout=3, read_timeout=10, attempts=1)
    try:
        client.head_bucket(Bucket=bucket or settings.bucket)
    except (bce.BotoCoreError, bce.ClientError) as exc:
        raise StorageError(describe_s3_error(exc, settings, bucket), transient=is_transient(exc)) from None


# -- compare-and-swap on one small object (S3 conditional writes; a lock file locally) --------

_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")


def read_tagged(uri: str, settings: Settings) -> tuple[bytes, str, float] | None:
    """(bytes, tag, age in seconds by the store's own clock) of an object, or None when absent.

    The tag changes with every write (the S3 ETag; a local file's SHA-256); the age is the
    store's time of the response minus the object's last write, so no two hosts' clocks
    are compared.
    """
    if not is_s3(uri):
        path = strip_scheme(uri)
        try:
            with open(path, "rb") as f:
                data, modified = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest(), time.time() - modified
    import botocore.exceptions as bce
    from email.utils import parsedate_to_datetime

    bucket, _, key = strip_scheme(uri).partition("/")
    try:
        resp = s3_client(settings).get_object(Bucket=bucket, Key=key)
    except bce.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
    return resp["Body"].read(), resp["ETag"], (now - resp["LastModified"]).total_seconds()


def put_if(uri: str, data: bytes, settings: Settings, *, tag: str | None) -> str | None:
    """Write ``data`` only if the object is absent (``tag=None``) or still carries ``tag``.

    Returns the new tag, or None when the condition failed (someone else wrote first).
    S3: ``If-None-Match: *`` / ``If-Match: <ETag>`` (honoured by AWS and SeaweedFS). A local
    file: an exclusive create (a whole temporary file linked into place, which fails when
    the name exists, as O_CREAT|O_EXCL does) or a compare-and-replace under an flock.
    """
    if not is_s3(uri):
        path = strip_scheme(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _local_tmp(path, data)
        try:
            if tag is None:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return None
            else:
                with _local_lock(path):
                    current = read_tagged(path, settings)
                    if current is None or current[1] != tag:
                        return None
                    os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()
    import botocore.exceptions as bce

    bucket, _, key = strip_scheme(uri).partition("/")
    condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
    try:
        return s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except bce.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _CONDITION_FAILED:
            return None
        raise


def delete_if(uri: str, settings: Settings, *, tag: str) -> bool:
    """Delete the object only while it still carries ``tag``; False when it changed or is gone."""
    if not is_s3(uri):
        path = strip_scheme(uri)
        with _local_lock(path):
            current = read_tagged(path, settings)
            if current is None or current[1] != tag:
                return False
            os.unlink(path)
        return True
    import botocore.exceptions as bce

    bucket, _, key = strip_scheme(uri).partition("/")
    try:
        s3_client(settings).delete_object(Bucket=bucket, Key=key, IfMatch=tag)
    except bce.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _CONDITION_FAILED:
            return False
        raise
    return True


def _local_tmp(path: str, data: bytes) -> str:
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


@contextlib.contextmanager
def _local_lock(path: str):
    parent, name = os.path.split(path)
    with open(os.path.join(parent, f".{name}.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
