"""Work items of a batch-denoise input: loose images and the members of .tar/.tar.gz/.zip archives.

Every image is one item keyed by its path relative to the input root; an archive
member's key is the archive's path plus the member's path (``night1.tar/sub/a.png``).
Archives are read as streams, one member at a time, under hard bounds:

* a member path that is absolute, has a drive letter or a ``..`` part is rejected, so
  nothing derived from it can land outside the output folder;
* a member whose declared size is over ``max_member_bytes`` is rejected from its
  header, without inflating it; one that inflates past the bound anyway (a lying
  header) is cut off after ``max_member_bytes + 1`` bytes;
* an archive stops being read once its members add up to ``max_archive_bytes`` or
  ``max_members``: what was read so far stays valid, the rest is one error.

Nothing here writes to the input.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterator

from pipeline.errors import PipelineError
from pipeline.pairs import IMAGE_EXTENSIONS
from pipeline.settings import Settings
from pipeline.storage import fsspec_for, is_s3, join, strip_scheme

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


class InputError(PipelineError):
    """The input root cannot be used at all (missing, empty, unreadable)."""


class ArchiveError(ValueError):
    """One archive member (or the rest of an archive) that cannot be a work item; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Bounds on what one input may expand to; the defaults fit 100 MP 16-bit TIFFs."""

    max_member_bytes: int = 1 << 30
    max_archive_bytes: int = 64 << 30
    max_members: int = 200_000


@dataclass(frozen=True)
class Source:
    """One file under the input root: a loose image, an archive, or something else."""

    rel: str
    uri: str
    size: int

    @property
    def kind(self) -> str:
        return kind_of(self.rel)


@dataclass(frozen=True)
class Item:
    """One work item: its bytes, or the reason it has none."""

    key: str
    uri: str
    data: bytes | None = None
    reason: str | None = None

    @property
    def checksum(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


def kind_of(path: str) -> str:
    """``image``, ``archive`` or ``other``, by file name."""
    lower = path.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if posixpath.splitext(lower)[1] in IMAGE_EXTENSIONS:
        return "image"
    return "other"


def safe_member_path(name: str) -> str:
    """The member's path normalised to ``a/b.png``; ArchiveError if it could escape its folder."""
    path = name.replace("\\", "/")
    if "\x00" in path:
        raise ArchiveError(f"unsafe member path {name!r}: NUL byte")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ArchiveError(f"unsafe member path {name!r}: absolute")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"unsafe member path {name!r}: contains '..'")
    if not parts:
        raise ArchiveError(f"unsafe member path {name!r}: empty")
    return "/".join(parts)


def list_sources(input_uri: str, settings: Settings) -> list[Source]:
    """Every file below the input root (hidden files and folders skipped), sorted by path.

    A single file is also accepted as the input: it becomes one source named by
    its base name.
    """
    fs, root = fsspec_for(input_uri, settings)
    try:
        if fs.isfile(root):
            return [Source(posixpath.basename(root), input_uri, int(fs.size(root)))]
        if not fs.isdir(root):
            raise InputError(f"INPUT {input_uri} does not exist")
        found = fs.find(root, detail=True)
    except (PermissionError, OSError) as exc:
        raise InputError(f"cannot list INPUT {input_uri}: {type(exc).__name__}: {exc}") from None
    sources = []
    for path, info in found.items():
        rel = posixpath.relpath(path, root)
        if info.get("type") == "directory" or any(part.startswith(".") for part in rel.split("/")):
            continue
        sources.append(Source(rel, _uri(input_uri, rel), int(info.get("size") or 0)))
    if not sources:
        raise InputError(f"INPUT {input_uri} holds no files (expected images or .tar/.tar.gz/.zip archives)")
    return sorted(sources, key=lambda s: s.rel)


def _uri(root_uri: str, rel: str) -> str:
    return join(root_uri, rel) if is_s3(root_uri) else join(str(root_uri).rstrip("/") or "/", rel)


def member_uri(archive_uri: str, member: str) -> str:
    """fsspec's chained URL of an archive member, e.g. ``tar://sub/a.png::s3://b/in/x.tar``."""
    protocol = "zip" if archive_uri.lower().endswith(".zip") else "tar"
    return f"{protocol}://{member}::{archive_uri}"


def iter_items(source: Source, settings: Settings, limits: Limits = Limits()) -> Iterator[Item]:
    """The work items of one source, read lazily (one member in memory at a time)."""
    kind = source.kind
    if kind == "other":
        yield Item(source.rel, source.uri, reason=_not_an_image_reason(source.rel))
        return
    fs, path = fsspec_for(source.uri, settings, shared=True)
    if kind == "image":
        if source.size > limits.max_member_bytes:
            yield Item(source.rel, source.uri, reason=_too_big(source.size, limits))
            return
        try:
            yield Item(source.rel, source.uri, data=fs.cat_file(path))
        except (OSError, ValueError) as exc:
            yield Item(source.rel, source.uri, reason=f"cannot read: {type(exc).__name__}: {exc}")
        return
    try:
        with fs.open(path, "rb") as stream:
            for member, data, reason in iter_archive(stream, source.rel, limits):
                key = f"{source.rel}/{member}"
                yield Item(key, member_uri(source.uri, member), data=data, reason=reason)
    except ArchiveError as exc:
        yield Item(source.rel, source.uri, reason=exc.reason)
    except (OSError, ValueError) as exc:
        yield Item(source.rel, source.uri, reason=f"cannot read archive: {type(exc).__name__}: {exc}")


def iter_archive(stream, name: str, limits: Limits = Limits()) -> Iterator[tuple[str, bytes | None, str | None]]:
    """``(member path, bytes or None, reason or None)`` for every file member of a tar or zip stream.

    Raises ArchiveError when the archive as a whole cannot be read (or its bounds
    are hit); the members yielded before that stay valid.
    """
    if name.lower().endswith(".zip"):
        yield from _iter_zip(stream, limits)
    else:
        yield from _iter_tar(stream, limits)


def _member_problem(name: str, size: int, limits: Limits, seen: set[str]) -> tuple[str, str | None]:
    """(safe path or raw name, reason it is rejected before reading)."""
    try:
        path = safe_member_path(name)
    except ArchiveError as exc:
        return _printable(name), exc.reason
    if path in seen:
        return path, "duplicate member path (the first one is used)"
    seen.add(path)
    if kind_of(path) == "archive":
        return path, "nested archive (not expanded; put it next to the others)"
    if kind_of(path) != "image":
        return path, _not_an_image_reason(path)
    if size > limits.max_member_bytes:
        return path, _too_big(size, limits)
    return path, None


def _read_bounded(member, limits: Limits) -> tuple[bytes | None, str | None]:
    data = member.read(limits.max_member_bytes + 1)
    if len(data) > limits.max_member_bytes:
        return None, f"inflates past the {limits.max_member_bytes} byte limit (declared size is wrong)"
    return data, None


def _iter_tar(stream, limits: Limits):
    total = count = 0
    seen: set[str] = set()
    try:
        # Stream mode: one pass, no seeking, transparent gzip; memory is one member.
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if info.isdir():
                    continue
                count += 1
                total += max(info.size, 0)
                _check_totals(count, total, limits)
                if not info.isfile():
                    what = "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
                    yield _printable(info.name), None, f"not a regular file ({what})"
                    continue
                path, reason = _member_problem(info.name, info.size, limits, seen)
                if reason:
                    yield path, None, reason
                    continue
                data, reason = _read_bounded(archive.extractfile(info), limits)
                yield path, data, reason
    except tarfile.TarError as exc:
        raise ArchiveError(f"unreadable or truncated tar archive: {exc}") from None
    except EOFError as exc:
        raise ArchiveError(f"truncated archive: {exc or 'unexpected end of data'}") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise ArchiveError(f"corrupt compressed archive: {exc}") from None


def _iter_zip(stream, limits: Limits):
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"unreadable zip archive: {exc}") from None
    total = count = 0
    seen: set[str] = set()
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            count += 1
            total += info.file_size
            _check_totals(count, total, limits)
            if stat.S_ISLNK(info.external_attr >> 16):
                yield _printable(info.filename), None, "not a regular file (symlink)"
                continue
            path, reason = _member_problem(info.filename, info.file_size, limits, seen)
            if reason:
                yield path, None, reason
                continue
            try:
                with archive.open(info) as member:
                    data, reason = _read_bounded(member, limits)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, zlib.error) as exc:
                data, reason = None, f"corrupt zip member: {exc}"
            yield path, data, reason


def _check_totals(count: int, total: int, limits: Limits) -> None:
    if count > limits.max_members:
        raise ArchiveError(f"more than {limits.max_members} members; the rest were not read")
    if total > limits.max_archive_bytes:
        raise ArchiveError(f"members add up to more than {limits.max_archive_bytes} bytes; the rest were not read")


def _too_big(size: int, limits: Limits) -> str:
    return f"{size} bytes is over the {limits.max_member_bytes} byte limit per image"


def _not_an_image_reason(path: str) -> str:
    extension = posixpath.splitext(path)[1]
    return f"not an image or archive ({'extension ' + repr(extension) if extension else 'no extension'})"


def _printable(name: str) -> str:
    return name.encode("unicode_escape").decode("ascii")


# -- demo input --------------------------------------------------------------------


def build_demo_inputs(dest_uri: str, settings: Settings, *, size: int = 96, seed: int = 0) -> dict:
    """A nightly drop for demos: noisy images in a tar plus loose ones, with clean references.

    Writes ``DEST/noisy/night1.tar`` (members ``sub/<key>.png``), loose
    ``DEST/noisy/<key>.png`` and the references under the same keys in
    ``DEST/clean/`` (``clean/night1.tar/sub/<key>.png`` is a folder, following
    the reference rule of the batch-denoise job). Returns the URIs and keys.
    """
    from pipeline.demo_data import demo_pairs
    from pipeline.images import encode_png
    from pipeline.storage import write_atomic

    pairs = demo_pairs(variants=1, size=size, seed=seed, names=("astronaut", "chelsea", "coffee", "rocket", "camera"))
    fs, root = fsspec_for(dest_uri, settings)
    noisy, clean = join(dest_uri, "noisy"), join(dest_uri, "clean")
    in_tar, loose = pairs[:3], pairs[3:]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, _, noisy_pixels in in_tar:
            data = encode_png(noisy_pixels)
            info = tarfile.TarInfo(f"sub/{key}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    write_atomic(fs, join(root, "noisy", "night1.tar"), buffer.getvalue())
    keys = []
    for key, clean_pixels, noisy_pixels in in_tar:
        keys.append(f"night1.tar/sub/{key}.png")
        write_atomic(fs, join(root, "clean", "night1.tar", "sub", f"{key}.png"), encode_png(clean_pixels))
    for key, clean_pixels, noisy_pixels in loose:
        keys.append(f"{key}.png")
        write_atomic(fs, join(root, "noisy", f"{key}.png"), encode_png(noisy_pixels))
        write_atomic(fs, join(root, "clean", f"{key}.png"), encode_png(clean_pixels))
    return {"input": noisy, "reference": clean, "keys": sorted(keys)}
