"""Decoding rules and failure reasons of pipeline.images, on real encoded bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageOps

from pipeline.images import (
    ImageError,
    apply_orientation,
    decode_image,
    decode_png_float,
    encode_png,
    reduce_to_uint8,
    to_float,
    to_uint8,
    to_uint16,
)


def pillow_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def random_pixels(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


def png_with_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) data does not have."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, **kwargs)
    return caught.value.reason


# -- accepted inputs and conversion rules ----------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    pixels=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.uint16]),
        shape=st.tuples(st.integers(1, 17), st.integers(1, 17), st.just(3)),
    )
)
def test_png_round_trip_is_lossless_for_8_and_16_bit(pixels):
    decoded = decode_image(encode_png(pixels))
    assert decoded.dtype == pixels.dtype
    np.testing.assert_array_equal(decoded, pixels)


def test_16_bit_png_is_a_valid_png_for_other_readers():
    pixels = random_pixels((9, 11, 3), np.uint16)
    # Pillow alone reads only the high byte of 16-bit colour: it must agree with it.
    high_bytes = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    np.testing.assert_array_equal(high_bytes, pixels >> 8)


def test_16_bit_rgb_tiff_keeps_16_bits_uncompressed_and_deflated():
    pixels = random_pixels((12, 7, 3), np.uint16)
    for compression in (None, "zlib"):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, pixels, photometric="rgb", compression=compression)
        np.testing.assert_array_equal(decode_image(buffer.getvalue()), pixels)


def test_16_bit_grayscale_png_is_replicated_and_kept_16_bit():
    gray = random_pixels((6, 5), np.uint16)
    decoded = decode_image(pillow_bytes(Image.fromarray(gray)))
    assert decoded.dtype == np.uint16 and decoded.shape == (6, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_grayscale_is_replicated_to_three_channels():
    gray = random_pixels((8, 10))
    decoded = decode_image(pillow_bytes(Image.fromarray(gray, "L")))
    assert decoded.shape == (8, 10, 3) and decoded.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_rgba_drops_alpha_without_compositing():
    rgba = random_pixels((5, 6, 4))
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its stored colour
    decoded = decode_image(pillow_bytes(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(decoded, rgba[:, :, :3])


def test_gray_alpha_and_16_bit_rgba_drop_alpha():
    la = random_pixels((4, 4, 2))
    decoded = decode_image(pillow_bytes(Image.fromarray(la, "LA")))
    np.testing.assert_array_equal(decoded, np.repeat(la[:, :, :1], 3, axis=2))
    rgba16 = random_pixels((4, 5, 4), np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgba16, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), rgba16[:, :, :3])


def test_palette_with_transparency_becomes_rgb():
    palette_image = Image.fromarray(random_pixels((6, 6, 3))).quantize(8)
    expected = np.asarray(palette_image.convert("RGB"))
    decoded = decode_image(pillow_bytes(palette_image, transparency=0))
    np.testing.assert_array_equal(decoded, expected)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(pillow_bytes(cmyk, "JPEG", quality=100))
    assert decoded.shape == (6, 8, 3)
    assert decoded[:, :, 0].min() > 200 and decoded[:, :, 1:].max() < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_viewers_do(orientation):
    pixels = random_pixels((4, 7, 3), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pillow_bytes(Image.fromarray(pixels), exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(apply_orientation(pixels, orientation), expected)


# -- rejected inputs ------------------------------------------------------------------


def test_zero_byte_file():
    assert reason_of(b"") == "zero-byte file"


def test_non_image_file():
    assert reason_of(b"clean,noisy\na.png,b.png\n") == "not an image (unrecognised format)"


def test_truncated_png():
    data = encode_png(random_pixels((64, 64, 3)))
    assert reason_of(data[: len(data) // 2]).startswith("truncated or corrupt PNG")


def test_truncated_jpeg():
    data = pillow_bytes(Image.fromarray(random_pixels((64, 64, 3))), "JPEG")
    assert reason_of(data[: len(data) // 2]).startswith("truncated or corrupt JPEG")


def test_corrupt_png_data():
    data = bytearray(encode_png(random_pixels((32, 32, 3))))
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 60] = b"\x00\xff" * 25  # garbage inside the zlib stream
    assert reason_of(bytes(data)).startswith("truncated or corrupt PNG")


def test_corrupt_png_header():
    data = bytearray(encode_png(random_pixels((4, 4, 3))))
    data[20:24] = b"\xff\xff\xff\xff"  # IHDR height and CRC no longer agree
    assert reason_of(bytes(data)) == "corrupt PNG header"


def test_too_large_is_refused_before_decoding():
    assert reason_of(png_with_header_only(20_000, 20_000)) == "too large: 400000000 px > limit 100000000"


def test_pillow_bomb_limit_becomes_image_error():
    # Above our own limit Pillow's hard decompression-bomb limit still applies.
    reason = reason_of(png_with_header_only(20_000, 20_000), max_pixels=10**9)
    assert reason == "decoded size exceeds limit"


def test_float_images_are_refused():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ones((4, 4), np.float32))
    assert reason_of(buffer.getvalue()).startswith("unsupported pixel format")


def test_side_prefix():
    error = ImageError("zero-byte file").on_side("noisy")
    assert isinstance(error, ValueError) and error.reason == "noisy: zero-byte file"


# -- value conversions ----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(pixels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_uint8_float_round_trip(pixels):
    as_float = to_float(pixels)
    assert as_float.dtype == np.float32 and as_float.min() >= 0.0 and as_float.max() <= 1.0
    np.testing.assert_array_equal(to_uint8(as_float), pixels)


@settings(max_examples=25, deadline=None)
@given(pixels=hnp.arrays(np.uint16, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_uint16_float_round_trip_and_reduction(pixels):
    np.testing.assert_array_equal(to_uint16(to_float(pixels)), pixels)
    np.testing.assert_array_equal(reduce_to_uint8(pixels), to_uint8(to_float(pixels)))


def test_to_uint8_rounds_and_clips():
    values = np.array([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 0, 1, 255, 255])


def test_decode_png_float():
    pixels = random_pixels((3, 4, 3), np.uint16)
    np.testing.assert_allclose(decode_png_float(encode_png(pixels)), pixels / 65535, atol=1e-7)


def test_encode_png_refuses_wrong_shapes_and_types():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError):
        encode_png(np.zeros((4, 4, 3), np.float32))
