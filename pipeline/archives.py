"""Work items of a batch-denoise input: loose images and the members of .tar/.tar.gz/.zip archives.

Every image is one item keyed by its path relative to the input root; an archive
member's key is the archive's path plus the member's path (``night1.tar/sub/a.png``).
A member name that is not valid UTF-8 keeps its bytes as surrogate escapes
(``b"\\xff.png"`` becomes ``"\\udcff.png"``), in tar and zip alike, whatever the
worker's locale. Archives are read as streams, one member at a time, under hard bounds:

* a member path that is absolute, has a drive letter, a NUL or a ``..`` part is
  rejected, so nothing derived from it can land outside the output folder;
* a member whose declared size is over ``max_member_bytes`` is rejected from its
  header, without inflating it; one that inflates past the bound anyway (a lying
  header) is cut off after ``max_member_bytes + 1`` bytes;
* an archive stops being read once its members add up to ``max_archive_bytes`` or
  ``max_members``: what was read so far stays valid, the rest is one error;
* tar: one member's headers (its 512-byte blocks, GNU long name/link, pax records,
  sparse maps) may take ``max_header_bytes``, checked before a declared size is read,
  and the global pax headers of the whole archive as much again; past that, or at a
  corrupt header after the first member, the rest of the archive is one error. Member
  headers are dropped as the stream moves on, so memory does not grow with the count;
* zip: the End Of Central Directory record (and the zip64 one when present) is read
  first: a central directory over ``max_central_directory_bytes`` or with more than
  ``max_members`` entries (declared or counted) rejects the whole archive before
  :mod:`zipfile` parses it; a member that cannot be read (corrupt, encrypted,
  unsupported compression) is an error of that member only.

Whatever an archive throws becomes a reason on a member or on the archive, never an
exception out of :func:`iter_items`. Nothing here writes to the input.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import lzma
import posixpath
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterator

from pipeline.errors import PipelineError, first_line
from pipeline.pairs import IMAGE_EXTENSIONS
from pipeline.settings import Settings
from pipeline.storage import fsspec_for, is_s3, join

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
    # One tar member's headers: names take a few KiB, but macOS tar keeps extended attributes
    # (resource forks included) in pax records.
    max_header_bytes: int = 1 << 20
    max_central_directory_bytes: int = 64 << 20  # 200,000 zip entries with long names fit


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
    except Exception as exc:  # storage failures, and whatever a hostile archive makes a reader raise
        yield Item(source.rel, source.uri, reason=f"cannot read archive: {first_line(exc)}")


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
        with _open_tar(stream, limits) as archive:
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
    except ArchiveError:
        raise
    except tarfile.TarError as exc:
        raise ArchiveError(f"unreadable or truncated tar archive: {exc}") from None
    except EOFError as exc:
        raise ArchiveError(f"truncated archive: {exc or 'unexpected end of data'}") from None
    except (gzip.BadGzipFile, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError(f"corrupt compressed archive: {exc}") from None
    except (ValueError, struct.error, RecursionError) as exc:  # header fields tarfile does not check
        raise ArchiveError(f"unreadable tar archive: {first_line(exc)}") from None


def _open_tar(stream, limits: Limits) -> tarfile.TarFile:
    """A one-pass (no seeking, transparent compression) reader under ``limits``."""

    class Archive(_BoundedTarFile):
        max_header_bytes = limits.max_header_bytes

    # Names are decoded the same on every worker; undecodable bytes survive as surrogates.
    return Archive.open(fileobj=stream, mode="r|*", encoding="utf-8", errors="surrogateescape")


# Extended headers (long name, long link, pax) in front of one member; tarfile reads each chain
# recursively, so without a cap a crafted chain ends in a RecursionError thousands of frames
# deep, whose traceback can itself overflow whoever formats it. Real archives use a few.
MAX_CHAINED_HEADERS = 32


class _TarInfo(tarfile.TarInfo):
    """Records the header error that makes ``TarFile.next`` end an archive without a word, and
    ends a chain of extended headers longer than :data:`MAX_CHAINED_HEADERS`."""

    @classmethod
    def fromtarfile(cls, archive):
        depth = getattr(archive, "header_depth", 0)
        if depth >= MAX_CHAINED_HEADERS:
            raise ArchiveError(f"a member has more than {MAX_CHAINED_HEADERS} chained extended headers "
                               "(long name, pax); the rest were not read")
        archive.header_depth = depth + 1
        try:
            return super().fromtarfile(archive)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            archive.header_problem = str(exc) or type(exc).__name__
            raise
        finally:
            archive.header_depth = depth


class _BoundedTarFile(tarfile.TarFile):
    """Stream-mode TarFile that keeps no member list and bounds the bytes one member's headers read.

    tarfile reads a long name or pax header whole, at the size its header declares,
    and a chain of them recursively; every such read goes through ``self.fileobj``
    inside :meth:`next`, which is where the budget sits.
    """

    tarinfo = _TarInfo
    max_header_bytes = Limits.max_header_bytes
    header_problem: str | None = None

    def next(self):
        self.members.clear()  # nothing reads them back in stream mode; kept, they grow with every member
        self.header_problem = None
        stream = self.fileobj
        self.fileobj = _HeaderBudget(stream, self.max_header_bytes)
        try:
            info = super().next()
        finally:
            self.fileobj = stream
        if info is None and self.header_problem and self.offset > 0:
            raise ArchiveError(f"corrupt tar header ({self.header_problem}); the rest were not read")
        if sum(len(key) + len(value) for key, value in self.pax_headers.items()) > self.max_header_bytes:
            raise ArchiveError(f"global pax headers add up to more than {self.max_header_bytes} bytes; "
                               "the rest were not read")
        return info


class _HeaderBudget:
    """The archive stream as header parsing sees it: reads past the budget are refused, not made."""

    def __init__(self, stream, budget: int):
        self._stream = stream
        self._left = budget
        self._budget = budget

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            raise ArchiveError(f"a member's headers (long name, pax or sparse) need more than {self._budget} "
                               "bytes; the rest were not read")
        data = self._stream.read(size)
        self._left -= len(data)
        return data

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, pos: int) -> int:
        return self._stream.seek(pos)


def _iter_zip(stream, limits: Limits):
    try:
        renamed, flag_offsets = _check_central_directory(stream, limits)
        archive = zipfile.ZipFile(_Utf8FlagCleared(stream, flag_offsets) if flag_offsets else stream)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError) as exc:
        raise ArchiveError(f"unreadable zip archive: {exc}") from None
    total = count = 0
    seen: set[str] = set()
    with archive:
        for index, info in enumerate(archive.infolist()):
            if info.is_dir():
                continue
            count += 1
            total += info.file_size
            _check_totals(count, total, limits)
            # A stored name with a NUL must be seen whole: zipfile cuts it there.
            name = info.orig_filename if "\0" in info.orig_filename else info.filename
            if index in renamed:
                name = name.encode("cp437").decode("utf-8", "surrogateescape")
            if stat.S_ISLNK(info.external_attr >> 16):
                yield _printable(name), None, "not a regular file (symlink)"
                continue
            path, reason = _member_problem(name, info.file_size, limits, seen)
            if reason:
                yield path, None, reason
                continue
            try:
                with archive.open(info) as member:
                    data, reason = _read_bounded(member, limits)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError,
                    zlib.error, lzma.LZMAError, struct.error) as exc:
                data, reason = None, f"corrupt zip member: {first_line(exc)}"
            yield path, data, reason


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
_UTF8_NAME = 0x800


def _check_central_directory(stream, limits: Limits) -> tuple[set[int], list[int]]:
    """Bound the central directory before zipfile reads it; find the names flagged UTF-8 that are not.

    zipfile would refuse the whole archive over one such name, so their flag is
    cleared on the way in (in the central directory and the local header) and the
    name is decoded here. Returns the indices of those entries and the offsets of
    the flag bytes to clear.
    """
    end = _end_of_central_directory(stream)
    if end is None:
        return set(), []  # not a zip: zipfile says so
    entries, cd_size, start, cd_offset = end
    if entries > limits.max_members:
        raise ArchiveError(f"zip central directory declares {entries} members, over the {limits.max_members} "
                           "limit; nothing was read")
    if cd_size > limits.max_central_directory_bytes:
        raise ArchiveError(f"zip central directory of {cd_size} bytes is over the "
                           f"{limits.max_central_directory_bytes} byte limit; nothing was read")
    concat = start - cd_offset  # bytes prepended to the archive (self-extractors)
    directory = _read_at(stream, start, cd_size)
    renamed, flag_offsets = set(), []
    pos = index = 0
    while pos + _CENTRAL_ENTRY.size <= len(directory):
        entry = _CENTRAL_ENTRY.unpack_from(directory, pos)
        if entry[0] != b"PK\x01\x02":
            break  # zipfile reports the damage
        if index >= limits.max_members:
            raise ArchiveError(f"zip central directory holds more than {limits.max_members} members; "
                               "nothing was read")
        flags, sizes, name_length, extra_length, comment_length = entry[5], entry[10:12], *entry[12:15]
        name_end = pos + _CENTRAL_ENTRY.size + name_length
        if flags & _UTF8_NAME and not _is_utf8(directory[pos + _CENTRAL_ENTRY.size:name_end]):
            header = entry[18] if entry[18] != 0xFFFFFFFF else _zip64_header_offset(
                directory[name_end:name_end + extra_length], sizes)
            renamed.add(index)
            flag_offsets.append(start + pos + 9)  # the flag's high byte in the central directory
            if header is not None:
                flag_offsets.append(header + concat + 7)  # and in the local header
        pos = name_end + extra_length + comment_length
        index += 1
    return renamed, sorted(flag_offsets)


def _end_of_central_directory(stream) -> tuple[int, int, int, int] | None:
    """(entries, central directory size, where it starts, the offset the archive gives for it).

    Finds the End Of Central Directory record as zipfile does (last 22 bytes, else
    the last signature in the final 64 KiB). With a zip64 locator, zip64 records
    take over; Python versions look for them in different places (just before the
    locator, or where the locator points), so the larger values of both are checked.
    """
    stream.seek(0, 2)
    size = stream.tell()
    tail_start = max(size - (1 << 16) - _EOCD.size, 0)
    tail = _read_at(stream, tail_start, (1 << 16) + _EOCD.size)
    if tail[-_EOCD.size:-_EOCD.size + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        at = len(tail) - _EOCD.size
    else:
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return None
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    location = tail_start + at
    locator = _read_at(stream, location - _EOCD64_LOCATOR.size, _EOCD64_LOCATOR.size)
    if len(locator) < _EOCD64_LOCATOR.size or locator[:4] != b"PK\x06\x07":
        return entries, cd_size, location - cd_size, cd_offset
    before = location - _EOCD64_LOCATOR.size - _EOCD64.size
    records = []
    for offset in dict.fromkeys((before, _EOCD64_LOCATOR.unpack(locator)[2])):
        record = _read_at(stream, offset, _EOCD64.size) if offset + _EOCD64.size <= size else b""
        if len(record) == _EOCD64.size and record[:4] == b"PK\x06\x06":
            records.append((offset, _EOCD64.unpack(record)))
    if not records:
        return entries, cd_size, location - cd_size, cd_offset
    offset, record = records[0]
    return (max(fields[7] for _, fields in records), max(fields[8] for _, fields in records),
            offset - record[8], record[9])


def _read_at(stream, offset: int, size: int) -> bytes:
    if offset < 0 or size <= 0:
        return b""
    stream.seek(offset)
    return stream.read(size)


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _zip64_header_offset(extra: bytes, sizes: tuple[int, int]) -> int | None:
    """The local header offset from a zip64 extra field (it follows the sizes the entry overflows)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            skip = 8 * sum(size == 0xFFFFFFFF for size in sizes)
            if skip + 8 <= length and pos + 4 + skip + 8 <= len(extra):
                return struct.unpack_from("<Q", extra, pos + 4 + skip)[0]
            return None
        pos += 4 + length
    return None


class _Utf8FlagCleared:
    """Read-only view of a zip stream with the UTF-8 name flag cleared at the given offsets."""

    def __init__(self, stream, offsets: list[int]):
        self._stream = stream
        self._offsets = offsets

    def read(self, size: int = -1) -> bytes:
        start = self._stream.tell()
        data = self._stream.read(size)
        first = bisect.bisect_left(self._offsets, start)
        last = bisect.bisect_left(self._offsets, start + len(data))
        if first == last:
            return data
        patched = bytearray(data)
        for offset in self._offsets[first:last]:
            patched[offset - start] &= ~(_UTF8_NAME >> 8) & 0xFF
        return bytes(patched)

    def seek(self, *args) -> int:
        return self._stream.seek(*args)

    def tell(self) -> int:
        return self._stream.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        """The stream belongs to the caller."""


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
