"""Work items of a batch-denoise input: listing, archive expansion, unsafe paths and size bounds."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
import zipfile

import numpy as np
import pytest

from pipeline.archives import (
    ArchiveError,
    InputError,
    Limits,
    Source,
    build_demo_inputs,
    iter_archive,
    iter_items,
    list_sources,
    member_uri,
    safe_member_path,
)
from pipeline.images import decode_image, encode_png
from pipeline.settings import Settings

SETTINGS = Settings()
PNG = encode_png(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))


def tar_bytes(members: dict[str, bytes], mode: str = "w", symlinks: dict[str, str] | None = None,
              tar_format: int = tarfile.DEFAULT_FORMAT) -> bytes:
    """A tar of ``members``; surrogate escapes in a name are written as the raw bytes they stand for."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tar_format, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def expand(data: bytes, name: str, limits: Limits = Limits()) -> dict[str, tuple[bytes | None, str | None]]:
    return {path: (content, reason) for path, content, reason in iter_archive(io.BytesIO(data), name, limits)}


@pytest.mark.parametrize("name, expected", [
    ("a.png", "a.png"), ("./sub//b.png", "sub/b.png"), ("sub\\c.png", "sub/c.png"), ("x/./y.png", "x/y.png"),
])
def test_safe_member_paths_are_normalised(name, expected):
    assert safe_member_path(name) == expected


@pytest.mark.parametrize("name, why", [
    ("../evil.png", "'..'"), ("sub/../../evil.png", "'..'"), ("/etc/evil.png", "absolute"),
    ("C:/evil.png", "absolute"), ("..\\evil.png", "'..'"), ("./", "empty"), ("a\x00.png", "NUL"),
])
def test_unsafe_member_paths_are_rejected(name, why):
    with pytest.raises(ArchiveError, match=why):
        safe_member_path(name)


@pytest.mark.parametrize("mode, name", [("w", "x.tar"), ("w:gz", "x.tar.gz"), ("w:gz", "x.tgz")])
def test_tar_members_are_streamed_with_their_bytes(mode, name):
    found = expand(tar_bytes({"a.png": PNG, "sub/b.PNG": PNG + b"", "c.jpg": b"jpeg?"}, mode), name)
    assert found == {"a.png": (PNG, None), "sub/b.PNG": (PNG, None), "c.jpg": (b"jpeg?", None)}


def test_zip_members_are_read_with_their_bytes():
    assert expand(zip_bytes({"a.png": PNG, "d/b.tif": b"tiff"}), "x.zip") == {
        "a.png": (PNG, None), "d/b.tif": (b"tiff", None)}


@pytest.mark.parametrize("pack, name", [(tar_bytes, "x.tar"), (zip_bytes, "x.zip")])
def test_bad_members_are_reported_and_the_rest_kept(pack, name):
    found = expand(pack({"../evil.png": PNG, "/abs.png": PNG, "notes.txt": b"hi", "inner.zip": b"PK",
                         "ok.png": PNG}), name)
    assert found["ok.png"] == (PNG, None)
    assert found["../evil.png"][0] is None and "unsafe member path" in found["../evil.png"][1]
    assert found["/abs.png"][0] is None and "absolute" in found["/abs.png"][1]
    assert found["notes.txt"] == (None, "not an image or archive (extension '.txt')")
    assert found["inner.zip"][0] is None and "nested archive" in found["inner.zip"][1]


def test_symlinks_and_duplicates_in_a_tar_are_rejected():
    data = tar_bytes({"a.png": PNG}, symlinks={"link.png": "/etc/passwd"})
    assert expand(data, "x.tar")["link.png"] == (None, "not a regular file (symlink)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for content in (PNG, b"second"):
            info = tarfile.TarInfo("a.png")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    rows = list(iter_archive(io.BytesIO(buffer.getvalue()), "x.tar"))
    assert rows[0] == ("a.png", PNG, None)
    assert rows[1] == ("a.png", None, "duplicate member path (the first one is used)")


def test_zip_bomb_member_is_rejected_from_its_declared_size():
    bomb = zip_bytes({"bomb.png": bytes(8 << 20), "ok.png": PNG})
    assert len(bomb) < 64 << 10  # 8 MiB of zeros deflates to a few KiB
    found = expand(bomb, "x.zip", Limits(max_member_bytes=1 << 20))
    assert found["bomb.png"] == (None, f"{8 << 20} bytes is over the {1 << 20} byte limit per image")
    assert found["ok.png"] == (PNG, None)


def test_zip_member_lying_about_its_size_is_cut_off():
    honest = zip_bytes({"liar.png": bytes(256 << 10)})
    # Patch the declared uncompressed size (local header and central directory) down to 100 bytes.
    size = (256 << 10).to_bytes(4, "little")
    lying = honest.replace(size, (100).to_bytes(4, "little"))
    assert lying != honest
    content, reason = expand(lying, "x.zip", Limits(max_member_bytes=1000))["liar.png"]
    assert content is None and reason.startswith("corrupt zip member")


def test_tar_gz_bomb_stops_at_the_archive_bound_without_inflating():
    # A header that claims 8 GiB, followed by nothing: reading it would take minutes.
    info = tarfile.TarInfo("huge.png")
    info.size = 8 << 30
    data = gzip.compress(info.tobuf() + bytes(1024))
    start = time.perf_counter()
    with pytest.raises(ArchiveError, match="members add up to more than"):
        list(iter_archive(io.BytesIO(data), "x.tar.gz", Limits(max_member_bytes=1 << 20, max_archive_bytes=1 << 30)))
    assert time.perf_counter() - start < 5
    found = list(iter_archive(io.BytesIO(tar_bytes({"a.png": PNG}, "w:gz")), "x.tar.gz", Limits(max_members=1)))
    assert found == [("a.png", PNG, None)]
    with pytest.raises(ArchiveError, match="more than 1 members"):
        list(iter_archive(io.BytesIO(tar_bytes({"a.png": PNG, "b.png": PNG})), "x.tar", Limits(max_members=1)))


def test_truncated_and_empty_archives_fail_after_the_good_members():
    data = tar_bytes({"a.png": PNG, "b.png": bytes(4096)})
    members = iter_archive(io.BytesIO(data[:2048]), "x.tar")
    assert next(members) == ("a.png", PNG, None)
    with pytest.raises(ArchiveError, match="truncated|unreadable"):
        list(members)
    for name in ("x.tar", "x.tar.gz", "x.zip"):
        with pytest.raises(ArchiveError):
            list(iter_archive(io.BytesIO(b""), name))
    with pytest.raises(ArchiveError, match="corrupt compressed|truncated|unreadable"):
        noise = np.random.default_rng(0).bytes(64 << 10)
        truncated = gzip.compress(tar_bytes({"a.png": PNG, "b.png": noise}))[: 32 << 10]
        list(iter_archive(io.BytesIO(truncated), "x.tar.gz"))


def test_list_sources_and_items_of_a_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "night.tar.gz").write_bytes(tar_bytes({"m/b.png": PNG, "../c.png": PNG}, "w:gz"))
    (tmp_path / "readme.md").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(PNG)
    (tmp_path / "big.png").write_bytes(PNG + bytes(5000))
    sources = list_sources(str(tmp_path), SETTINGS)
    assert [(s.rel, s.kind) for s in sources] == [
        ("big.png", "image"), ("night.tar.gz", "archive"), ("readme.md", "other"), ("sub/a.png", "image")]
    limits = Limits(max_member_bytes=len(PNG) + 100)
    items = {item.key: item for source in sources for item in iter_items(source, SETTINGS, limits)}
    assert set(items) == {"big.png", "night.tar.gz/m/b.png", "night.tar.gz/../c.png", "readme.md", "sub/a.png"}
    assert items["sub/a.png"].data == PNG and items["sub/a.png"].reason is None
    assert items["night.tar.gz/m/b.png"].data == PNG
    assert items["night.tar.gz/m/b.png"].uri == member_uri(str(tmp_path / "night.tar.gz"), "m/b.png")
    assert items["night.tar.gz/m/b.png"].uri.startswith("tar://m/b.png::")
    assert items["night.tar.gz/../c.png"].data is None
    assert "over the" in items["big.png"].reason and items["big.png"].data is None
    assert "not an image" in items["readme.md"].reason
    assert len(items["sub/a.png"].checksum) == 64
    assert (tmp_path / "night.tar.gz").stat().st_size > 0  # inputs untouched


def test_unreadable_archive_is_one_item_with_a_reason(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    [source] = list_sources(str(tmp_path), SETTINGS)
    [item] = list(iter_items(source, SETTINGS))
    assert item.key == "broken.zip" and item.data is None and "unreadable zip" in item.reason


def test_missing_or_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_sources(str(tmp_path / "nope"), SETTINGS)
    (tmp_path / ".only-hidden").write_text("x")
    with pytest.raises(InputError, match="holds no files"):
        list_sources(str(tmp_path), SETTINGS)


def test_a_single_file_is_an_input(tmp_path):
    (tmp_path / "one.png").write_bytes(PNG)
    assert list_sources(str(tmp_path / "one.png"), SETTINGS) == [Source("one.png", str(tmp_path / "one.png"), len(PNG))]


def test_demo_inputs_have_references_under_the_same_keys(tmp_path):
    demo = build_demo_inputs(str(tmp_path), SETTINGS, size=32)
    items = [i for s in list_sources(demo["input"], SETTINGS) for i in iter_items(s, SETTINGS)]
    assert sorted(i.key for i in items) == demo["keys"] and len(items) == 5
    assert any(k.startswith("night1.tar/") for k in demo["keys"])
    for item in items:
        noisy = decode_image(item.data)
        clean = decode_image((tmp_path / "clean" / item.key).read_bytes())
        assert noisy.shape == clean.shape and max(noisy.shape) == 32
        assert not np.array_equal(noisy, clean)
