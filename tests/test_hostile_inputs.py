"""Hostile archives and images: each case gets a clear reason, the rest of the input still comes
through, nothing escapes as a raw exception and the input bytes stay as they were."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
import tifffile
from PIL import EpsImagePlugin, Image, features

from pipeline.archives import Limits, iter_items, list_sources
from pipeline.images import FORMATS, ImageError, apply_orientation, decode_image, encode_png
from pipeline.settings import Settings
from tests.test_archives import PNG, tar_bytes
from tests.test_images import pillow_bytes, random_pixels

SETTINGS = Settings()


def items_of(tmp_path, name: str, data: bytes, limits: Limits = Limits()) -> dict:
    """The items of one archive file, checking the file is unchanged and every reason is plain text."""
    (tmp_path / name).write_bytes(data)
    [source] = list_sources(str(tmp_path / name), SETTINGS)
    items = {item.key: item for item in iter_items(source, SETTINGS, limits)}
    assert (tmp_path / name).read_bytes() == data
    for item in items.values():
        assert item.reason is None or item.reason.encode("utf-8")  # reports are UTF-8 text
    return items


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
