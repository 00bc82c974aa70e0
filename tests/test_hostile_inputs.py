"""Hostile archives and images: each case gets a clear reason, the rest of the input still comes
through, nothing escapes as a raw exception and the input bytes stay as they were."""

from __future__ import annotations

import bz2
import gc
import gzip
import io
import lzma
import struct
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import tifffile
from PIL import EpsImagePlugin, Image, features

from pipeline.archives import ArchiveError, Limits, iter_archive, iter_items, list_sources, member_uri
from pipeline.images import FORMATS, ImageError, apply_orientation, decode_image, encode_png
from pipeline.settings import Settings
from tests.test_archives import PNG, tar_bytes, zip_bytes
from tests.test_images import pillow_bytes, random_pixels

SETTINGS = Settings()


def rows(data: bytes, name: str, limits: Limits = Limits()) -> tuple[list, str | None]:
    """Every row an archive yields, and the archive-level reason that ended it (None: it ended cleanly)."""
    found = []
    try:
        for row in iter_archive(io.BytesIO(data), name, limits):
            found.append(row)
    except ArchiveError as exc:
        return found, exc.reason
    return found, None


def items_of(tmp_path, name: str, data: bytes, limits: Limits = Limits()) -> dict:
    """The items of one archive file, checking the file is unchanged and every reason is plain text."""
    (tmp_path / name).write_bytes(data)
    [source] = list_sources(str(tmp_path / name), SETTINGS)
    items = {item.key: item for item in iter_items(source, SETTINGS, limits)}
    assert (tmp_path / name).read_bytes() == data
    for item in items.values():
        assert item.reason is None or item.reason.encode("utf-8")  # reports are UTF-8 text
    return items


# -- tar: member names ---------------------------------------------------------------


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_member_with_a_non_utf8_name_keeps_its_bytes_as_surrogates(tmp_path, tar_format):
    data = tar_bytes(dict.fromkeys(["\udcff.png", "ok.png", "../\udcfe.png", "\udcfd.txt"], PNG), tar_format=tar_format)
    assert b"\xff.png" in data
    items = items_of(tmp_path, "night.tar", data)
    odd = items["night.tar/\udcff.png"]
    assert odd.data == PNG and odd.reason is None and len(odd.checksum) == 64
    assert odd.key.encode("utf-8", "surrogateescape") == b"night.tar/\xff.png"
    assert odd.uri == member_uri(str(tmp_path / "night.tar"), "\udcff.png")
    assert items["night.tar/ok.png"].data == PNG
    assert "unsafe member path" in items["night.tar/../\\udcfe.png"].reason
    assert items["night.tar/\udcfd.txt"].reason == "not an image or archive (extension '.txt')"


def test_long_names_within_the_header_bound_are_read():
    name = "d/" + "n" * 3000 + ".png"
    for tar_format in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        assert rows(tar_bytes({name: PNG, "b.png": PNG}, tar_format=tar_format), "x.tar") == (
            [(name, PNG, None), ("b.png", PNG, None)], None)


# -- tar: header bounds -----------------------------------------------------------------


class Endless(io.RawIOBase):
    """``prefix`` then zeros up to ``size`` bytes, served lazily; counts what was read."""

    def __init__(self, prefix: bytes, size: int):
        self.prefix, self.size, self.served = prefix, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.served)
        chunk = self.prefix[self.served:self.served + n]
        buffer[:n] = chunk + bytes(n - len(chunk))
        self.served += n
        return n


def header_block(kind: bytes, size: int, name: str = "././@LongLink") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def pax_records(records: dict[str, str]) -> bytes:
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + len(str(len(body)))
        length = len(body) + len(str(length))  # the length counts its own digits
        out += str(length).encode() + body
    return out


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member_block(name: str, content: bytes = PNG) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info.tobuf(tarfile.USTAR_FORMAT) + padded(content)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                                  tarfile.XGLTYPE])
def test_huge_long_name_or_pax_header_is_refused_before_it_is_read(kind):
    # A header declaring a 1 GiB name, in front of 1 GiB of stream: tarfile alone reads it all.
    stream = Endless(member_block("a.png") + header_block(kind, 1 << 30), 2 << 30)
    found, reason = [], None
    try:
        found.extend(iter_archive(io.BufferedReader(stream), "x.tar"))
    except ArchiveError as exc:
        reason = exc.reason
    assert found == [("a.png", PNG, None)]
    assert reason == (f"a member's headers (long name, pax or sparse) need more than {Limits().max_header_bytes} "
                      "bytes; the rest were not read")
    assert stream.served < 1 << 20


@pytest.mark.parametrize("links, limits, reason", [
    (20, Limits(max_header_bytes=16 << 10), "a member's headers (long name, pax or sparse) need more than 16384"),
    (3000, Limits(max_header_bytes=64 << 20), "a member has more than 32 chained extended headers"),
])
def test_chained_long_name_headers_end_the_archive_clearly(links, limits, reason):
    # Each long-name header makes tarfile read the next one recursively: the byte budget or the
    # cap on the chain ends it, long before the stack would.
    name = padded(b"x" * 600)
    chain = (header_block(tarfile.GNUTYPE_LONGNAME, len(name)) + name) * links
    found, why = rows(member_block("a.png") + chain + member_block("b.png") + bytes(1024), "x.tar", limits)
    assert found == [("a.png", PNG, None)] and why.startswith(reason)


def test_global_pax_headers_are_bounded_over_the_whole_archive():
    data = member_block("a.png")
    for i in range(100):
        records = pax_records({f"x.note{i}": "v" * 1000})
        data += header_block(tarfile.XGLTYPE, len(records), "pax") + padded(records) + member_block(f"m{i}.png")
    found, reason = rows(data + bytes(1024), "x.tar", Limits(max_header_bytes=64 << 10))
    assert found[0] == ("a.png", PNG, None) and 40 < len(found) < 80
    assert all(content == PNG for _, content, _ in found)
    assert reason == "global pax headers add up to more than 65536 bytes; the rest were not read"


def test_member_headers_are_dropped_as_the_stream_moves_on():
    data = b"".join(tarfile.TarInfo(f"m{i}.txt").tobuf(tarfile.USTAR_FORMAT) for i in range(5000)) + bytes(1024)
    members = iter_archive(io.BytesIO(data), "x.tar")
    for _ in range(4000):
        next(members)
    gc.collect()  # count what the stream still holds, not cyclic garbage of earlier tests
    alive = sum(isinstance(obj, tarfile.TarInfo) for obj in gc.get_objects())
    assert alive < 10
    assert len(list(members)) == 1000


def test_a_corrupt_header_after_good_members_is_reported_not_a_silent_end():
    good = member_block("a.png")
    broken = bytearray(member_block("b.png"))
    broken[148:156] = b"0000000\0"  # wrong checksum
    found, reason = rows(good + bytes(broken) + member_block("c.png") + bytes(1024), "x.tar")
    assert found == [("a.png", PNG, None)] and reason == "corrupt tar header (bad checksum); the rest were not read"
    found, reason = rows(good + b"\x01" * 300, "x.tar")  # a torn last block
    assert found == [("a.png", PNG, None)] and reason.startswith("corrupt tar header")
    assert rows(good, "x.tar") == ([("a.png", PNG, None)], None)  # no end-of-archive blocks: fine


def sparse_10_member(sparse_map: bytes) -> bytes:
    records = pax_records({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s.png",
                           "GNU.sparse.realsize": "100"})
    return (header_block(tarfile.XHDTYPE, len(records), "pax") + padded(records)
            + member_block("GNUSparseFile.0/s.png", padded(sparse_map)))


NOISE_TAR = tar_bytes({"a.png": PNG, "b.png": np.random.default_rng(0).bytes(30000)})


@pytest.mark.parametrize("name, data, reason", [
    ("x.tar", member_block("a.png") + sparse_10_member(b"one\n2\n"),  # a sparse map that is not numbers
     "unreadable tar archive: ValueError: invalid literal for int() with base 10: b'one'"),
    ("x.tar", member_block("a.png") + member_block("b.png", bytes(4096))[:1500],
     "unreadable or truncated tar archive: unexpected end of data"),
    ("x.tar.gz", gzip.compress(NOISE_TAR)[:9000], "unreadable or truncated tar archive: unexpected end of data"),
    ("x.tar", lzma.compress(NOISE_TAR)[:9000], "unreadable or truncated tar archive: unexpected end of data"),
    ("x.tar", bz2.compress(NOISE_TAR)[:9000], None),  # bzip2 gives nothing before its block ends
])
def test_a_tar_that_breaks_mid_stream_keeps_the_members_before(tmp_path, name, data, reason):
    items = items_of(tmp_path, name, data)
    assert items[name].data is None
    if reason:
        assert items[f"{name}/a.png"].data == PNG and items[name].reason == reason
    else:
        assert set(items) == {name} and items[name].reason.startswith("unreadable or truncated tar archive")


# -- zip: central directory bounds --------------------------------------------------------


EOCD = struct.Struct("<4s4H2LH")


def eocd_patched(data: bytes, **fields) -> bytes:
    at = data.rindex(b"PK\x05\x06")
    values = dict(zip(["sig", "disk", "disk_cd", "entries_disk", "entries", "cd_size", "cd_offset", "comment"],
                      EOCD.unpack_from(data, at)))
    values.update(fields)
    return data[:at] + EOCD.pack(*values.values()) + data[at + EOCD.size:]


def with_zip64_eocd(data: bytes, *, entries: int | None = None, cd_size: int | None = None) -> bytes:
    """The archive with a zip64 end record (true values unless overridden) and a 32-bit one full of 0xFF."""
    at = data.rindex(b"PK\x05\x06")
    _, _, _, _, count, size, offset, _ = EOCD.unpack_from(data, at)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries or count, entries or count,
                         cd_size or size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    end = EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:at] + record + locator + end


@pytest.fixture
def zipfile_parse_forbidden(monkeypatch):
    """Fails a test where zipfile parses a central directory the bounds should have refused first."""

    def refuse(self):
        raise AssertionError("zipfile parsed the central directory before the bounds were checked")

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", refuse)


MANY = zip_bytes({f"m{i}.png": PNG for i in range(20)})


@pytest.mark.parametrize("data, limits, reason", [
    (eocd_patched(MANY, entries=0xFFFF), Limits(max_members=100),
     "zip central directory declares 65535 members, over the 100 limit; nothing was read"),
    (eocd_patched(MANY, cd_size=0xFFFFFF00), Limits(),
     f"zip central directory of {0xFFFFFF00} bytes is over the {64 << 20} byte limit; nothing was read"),
    (with_zip64_eocd(MANY, entries=10**9), Limits(),
     "zip central directory declares 1000000000 members, over the 200000 limit; nothing was read"),
    (with_zip64_eocd(MANY, cd_size=1 << 40), Limits(),
     f"zip central directory of {1 << 40} bytes is over the {64 << 20} byte limit; nothing was read"),
    (eocd_patched(MANY, entries=1, entries_disk=1), Limits(max_members=5),
     "zip central directory holds more than 5 members; nothing was read"),
])
def test_zip_central_directory_is_bounded_before_zipfile_parses_it(zipfile_parse_forbidden, data, limits, reason):
    assert rows(data, "x.zip", limits) == ([], reason)


def test_zip64_end_record_is_followed():
    found, reason = rows(with_zip64_eocd(MANY), "x.zip")
    assert reason is None and len(found) == 20 and all(content == PNG for _, content, _ in found)


# -- zip: names and members -----------------------------------------------------------


def test_zip_name_flagged_utf8_that_is_not_keeps_its_bytes_and_the_archive(tmp_path):
    honest = zip_bytes({"é.png": PNG, "ok.png": PNG, "é.txt": b"text"})
    data = honest.replace("é".encode(), b"\xff\xfe")
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(io.BytesIO(data))  # what zipfile alone does with it
    items = items_of(tmp_path, "night.zip", data)
    assert set(items) == {"night.zip/\udcff\udcfe.png", "night.zip/ok.png", "night.zip/\udcff\udcfe.txt"}
    assert items["night.zip/\udcff\udcfe.png"].data == PNG
    assert items["night.zip/ok.png"].data == PNG
    assert items["night.zip/\udcff\udcfe.txt"].reason == "not an image or archive (extension '.txt')"


def with_zip64_header_offsets(data: bytes) -> bytes:
    """The archive with every central entry's local header offset moved into a zip64 extra field."""
    at = data.rindex(b"PK\x05\x06")
    _, _, _, _, count, size, offset, _ = EOCD.unpack_from(data, at)
    entries, pos = b"", offset
    for _ in range(count):
        fields = list(struct.unpack_from("<4s4B4HL2L5H2L", data, pos))
        name_length, extra_length, comment_length = fields[12:15]
        variable = data[pos + 46:pos + 46 + name_length + extra_length + comment_length]
        name, rest = variable[:name_length], variable[name_length:]
        extra = rest[:extra_length] + struct.pack("<HHQ", 1, 8, fields[18])
        fields[13], fields[18] = len(extra), 0xFFFFFFFF
        entries += struct.pack("<4s4B4HL2L5H2L", *fields) + name + extra + rest[extra_length:]
        pos += 46 + len(variable)
    end = EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(entries), offset, 0)
    return data[:offset] + entries + end


def test_zip_name_flagged_utf8_that_is_not_with_a_zip64_header_offset():
    data = with_zip64_header_offsets(zip_bytes({"ok.png": PNG, "é.png": PNG}).replace("é".encode(), b"\xff\xfe"))
    found, reason = rows(data, "x.zip")
    assert reason is None and found == [("ok.png", PNG, None), ("\udcff\udcfe.png", PNG, None)]


def test_zip_name_with_a_nul_is_unsafe_not_cut_short():
    data = zip_bytes({"evil.pngX.txt": b"x", "ok.png": PNG}).replace(b"evil.pngX", b"evil.png\0")
    found, reason = rows(data, "x.zip")
    assert reason is None and found[1] == ("ok.png", PNG, None)
    assert found[0][1] is None and "NUL byte" in found[0][2]


def patched_member(data: bytes, name: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite bytes at ``offset`` into the local header and the central entry of member ``name``."""
    out = bytearray(data)
    for signature, name_at in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at:start + name_at + len(name)] == name:
                field = offset if signature == b"PK\x03\x04" else offset + 2  # central entries have 2 more bytes
                out[start + field:start + field + len(value)] = value
            start += 4
    return bytes(out)


@pytest.mark.parametrize("offset, value, why", [
    (8, struct.pack("<H", 9), "NotImplementedError"),  # deflate64: not supported by zipfile
    (6, struct.pack("<H", 1), "RuntimeError"),  # encrypted, no password
    (14, b"\0\0\0\0", "BadZipFile"),  # wrong CRC
])
def test_unreadable_zip_member_is_that_members_error_only(offset, value, why):
    data = patched_member(zip_bytes({"bad.png": PNG, "ok.png": PNG}), b"bad.png", offset, value)
    found, reason = rows(data, "x.zip")
    assert reason is None and found[1] == ("ok.png", PNG, None)
    assert found[0][:2] == ("bad.png", None) and found[0][2].startswith(f"corrupt zip member: {why}")


# -- images ---------------------------------------------------------------------------------


def exif_orientation(type_code: int, count: int, payload: bytes) -> bytes:
    """EXIF holding only an orientation tag of the given TIFF type, count and raw value."""
    value, extra = (payload.ljust(4, b"\0"), b"") if len(payload) <= 4 else (struct.pack("<I", 26), payload)
    ifd = struct.pack("<HHHI", 1, 0x0112, type_code, count) + value + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + extra


PIXELS = random_pixels((4, 7, 3), seed=1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("type_code, count, payload", [
    (2, 2, b"6\0"),  # ASCII
    (7, 1, b"\x06"),  # bytes
    (5, 1, struct.pack("<II", 6, 1)),  # rational
    (11, 1, struct.pack("<f", 6.0)),  # float
    (3, 1, struct.pack("<H", 0)),
    (3, 1, struct.pack("<H", 9)),
    (3, 1, struct.pack("<H", 65535)),
    (8, 1, struct.pack("<h", -1)),
], ids=["ascii", "bytes", "rational", "float", "zero", "nine", "65535", "negative"])
def test_unusable_exif_orientation_is_ignored(fmt, type_code, count, payload):
    data = pillow_bytes(Image.fromarray(PIXELS), fmt, exif=exif_orientation(type_code, count, payload))
    as_stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data), as_stored)


@pytest.mark.parametrize("value", ["6", b"\x06", 6.0, (6, 6), None, 0, 9, -3])
def test_apply_orientation_leaves_pixels_for_unusable_values(value):
    np.testing.assert_array_equal(apply_orientation(PIXELS, value), PIXELS)


def test_eps_payload_under_a_png_name_never_reaches_ghostscript(monkeypatch, tmp_path):
    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("ghostscript called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = pillow_bytes(Image.fromarray(PIXELS), "EPS")
    with pytest.raises(OSError, match="ghostscript called"):
        Image.open(io.BytesIO(eps)).load()  # Pillow unrestricted would hand it to Ghostscript
    calls.clear()
    with pytest.raises(ImageError) as caught:
        decode_image(eps)
    assert caught.value.reason == "unsupported image format (EPS)" and calls == []
    items = items_of(tmp_path, "night.tar", tar_bytes({"photo.png": eps, "ok.png": PNG}))
    assert items["night.tar/photo.png"].data == eps  # the archive hands over bytes; decoding refuses them


REFUSED = [fmt for fmt in ("PCX", "TGA", "SGI", "ICO", "QOI", "DDS", "SPIDER", "JPEG2000")
           if fmt != "JPEG2000" or features.check("jpg_2000")]


@pytest.mark.parametrize("fmt", REFUSED)
def test_formats_outside_the_list_are_refused_whatever_the_name(fmt):
    with pytest.raises(ImageError, match="unsupported image format|not an image"):
        decode_image(pillow_bytes(Image.fromarray(PIXELS), fmt))


@pytest.mark.parametrize("fmt, args", [("BMP", {}), ("WEBP", {"lossless": True}), ("PPM", {}), ("GIF", {}),
                                       ("TIFF", {}), ("PNG", {})])
def test_listed_formats_decode(fmt, args):
    assert fmt in FORMATS
    image = Image.fromarray(PIXELS).quantize(256).convert("RGB") if fmt == "GIF" else Image.fromarray(PIXELS)
    np.testing.assert_array_equal(decode_image(pillow_bytes(image, fmt, **args)), np.asarray(image))


def test_multi_picture_jpeg_from_a_camera_still_decodes():
    mpo = pillow_bytes(Image.fromarray(PIXELS), "MPO", save_all=True, append_images=[Image.fromarray(PIXELS[::-1])])
    assert decode_image(mpo).shape == (4, 7, 3)


def test_tiff_with_a_float_strip_offset_is_an_image_error():
    # Pillow's TIFF loader raises TypeError on a strip offset stored as FLOAT (found by byte flips).
    data = bytearray(pillow_bytes(Image.fromarray(PIXELS), "TIFF"))
    entries = struct.unpack_from("<H", data, 8)[0]
    for at in range(10, 10 + 12 * entries, 12):
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, at + 2, 11)
    with pytest.raises(ImageError, match="truncated or corrupt TIFF: TypeError"):
        decode_image(bytes(data))


def fuzz_corpus() -> dict[str, bytes]:
    image = Image.fromarray(random_pixels((12, 10, 3), seed=2))
    exif = Image.Exif()
    exif[0x0112] = 6
    tiff16 = io.BytesIO()
    tifffile.imwrite(tiff16, random_pixels((9, 8, 3), np.uint16, seed=3), photometric="rgb", compression="zlib")
    saves = {"png": ("PNG", {}), "jpeg": ("JPEG", {"exif": exif}), "progressive": ("JPEG", {"progressive": True}),
             "bmp": ("BMP", {}), "webp": ("WEBP", {}), "ppm": ("PPM", {}), "tiff": ("TIFF", {"exif": exif}),
             "tiff-lzw": ("TIFF", {"compression": "tiff_lzw"})}
    corpus = {name: pillow_bytes(image, fmt, **args) for name, (fmt, args) in saves.items()}
    corpus.update(gif=pillow_bytes(image.quantize(16), "GIF"), pgm=pillow_bytes(image.convert("L"), "PPM"),
                  png16=encode_png(random_pixels((9, 8, 3), np.uint16, seed=4)), tiff16=tiff16.getvalue())
    return corpus


def test_byte_flips_and_truncations_give_image_errors_only():
    rng = np.random.default_rng(0)
    outcomes = {"decoded": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data in fuzz_corpus().values():
            for _ in range(150):
                damaged = bytearray(data)
                for pos in rng.integers(0, len(damaged), rng.integers(1, 6)):
                    damaged[pos] = rng.integers(0, 256)
                if rng.random() < 0.2:
                    damaged = damaged[: rng.integers(1, len(damaged))]
                try:
                    decode_image(bytes(damaged))
                    outcomes["decoded"] += 1
                except ImageError as exc:
                    assert exc.reason and "\n" not in exc.reason
                    outcomes["refused"] += 1
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 100
