"""Image decoding and encoding with one set of colour and bit-depth rules.

Every photo entering the pipeline goes through :func:`decode_image`, so clean and
noisy sides of a pair are always converted the same way:

* result is ``H x W x 3``, ``uint8`` or ``uint16`` (16-bit PNG/TIFF keep 16 bits);
* grayscale is replicated to three channels;
* alpha (LA, PA, RGBA) is dropped, not composited: the colour samples are kept as
  stored, because a denoising pair must keep the sensor values, not a blend;
* palette images are expanded to RGB; CMYK and YCbCr are converted by Pillow's
  plain formulas (ICC profiles are ignored);
* the EXIF orientation tag is applied, so the array is upright as a viewer shows it; a tag
  that is not an integer 1..8 (stored as text, bytes, a fraction or a float, or 0, 9+) is
  ignored rather than refused: a malformed tag says nothing reliable, so the pixels are kept as
  stored (of a tag with several values Pillow keeps the first);
* multi-frame files (GIF, multi-page TIFF) contribute their first frame only;
* float and 32-bit integer images are rejected;
* the file's contents are only ever parsed as PNG, JPEG, TIFF, BMP, WebP, PPM (PGM/PNM)
  or GIF, whatever its name says: Pillow's other plug-ins (EPS and its Ghostscript
  call, PSD, ...) never see input bytes.

Any failure, whatever the decoder raised on hostile bytes, is an :class:`ImageError`
whose ``reason`` is short enough for a quarantine report.
"""

from __future__ import annotations

import io
import operator
import re
import struct
import sys
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import first_line

DEFAULT_MAX_PIXELS = 100_000_000
# Pillow plug-ins allowed to parse input bytes.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "PPM", "GIF")

_EXIF_ORIENTATION = 0x0112
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
    (b"RIFF", "WEBP"),
)
# Formats Pillow could read but the pipeline refuses, named so the reason says what the file is.
_REFUSED_SIGNATURES = (
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"),
)
_SIXTEEN_BIT_COLOUR_RAWMODE = re.compile(r"^RGBA?;16[BLN]$")
_SIXTEEN_BIT_GRAY = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """A file that cannot become a training image; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def on_side(self, side: str) -> "ImageError":
        """The same error, prefixed with which side of a pair it came from."""
        return ImageError(f"{side}: {self.reason}")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a photo to ``H x W x 3`` uint8/uint16 under the module's rules.

    The size limit is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    if len(data) == 0:
        raise ImageError("zero-byte file")
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's global warning threshold.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = _open(data)
        except UnidentifiedImageError:
            raise ImageError(_unidentified_reason(data)) from None
        except Image.DecompressionBombError as exc:
            raise _bomb_error(exc, max_pixels) from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
            raise ImageError(f"corrupt image header: {exc}") from None
        except Exception as exc:  # a plug-in's parser bug on hostile bytes (IndexError, KeyError, ...)
            raise ImageError(f"corrupt image header: {first_line(exc)}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"too large: {width * height} px > limit {max_pixels}")
        try:
            pixels = _pixels(image, data)
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Image.DecompressionBombError as exc:
            raise _bomb_error(exc, max_pixels) from None
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as exc:
            if "Decompressed Data Too Large" in str(exc):
                raise ImageError("decoded size exceeds limit") from None
            raise ImageError(f"truncated or corrupt {image.format}: {exc}") from None
        except Exception as exc:  # a plug-in's decoder bug on hostile bytes
            raise ImageError(f"truncated or corrupt {image.format}: {first_line(exc)}") from None
    return np.ascontiguousarray(apply_orientation(pixels, orientation))


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=FORMATS)


def _unidentified_reason(data: bytes) -> str:
    """Tell a damaged image, a refused image format and a non-image apart by magic bytes."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return f"corrupt {name} header"
    for signature, name in _REFUSED_SIGNATURES:
        if data.startswith(signature):
            return f"unsupported image format ({name})"
    return "not an image (unrecognised format)"


def _bomb_error(exc: Exception, max_pixels: int) -> ImageError:
    # Pillow refuses huge headers (over twice Image.MAX_IMAGE_PIXELS) while opening,
    # before our own check; its message carries the pixel count.
    claimed = re.search(r"\((\d+) pixels\)", str(exc))
    if claimed and int(claimed[1]) > max_pixels:
        return ImageError(f"too large: {claimed[1]} px > limit {max_pixels}")
    return ImageError("decoded size exceeds limit")


def _pixels(image: Image.Image, data: bytes) -> np.ndarray:
    """Pixels of an opened image as H x W x 3, keeping 16-bit depth."""
    sixteen_bit_colour = _is_sixteen_bit_colour(image)  # tiles are gone after load()
    image.load()
    mode = image.mode
    if mode in _SIXTEEN_BIT_GRAY or mode == "I":
        gray = np.asarray(image)
        if mode == "I" and (gray.min() < 0 or gray.max() > 65535):
            raise ImageError("unsupported pixel format: 32-bit integer")
        return np.repeat(gray.astype(np.uint16)[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageError("unsupported pixel format: floating point")
    if sixteen_bit_colour:
        return _sixteen_bit_colour(image, data)[:, :, :3]
    # Pillow's conversions to RGB drop alpha without compositing.
    return np.asarray(image.convert("RGB"))


def _rawmode(tile) -> str:
    args = tile.args
    return args[0] if isinstance(args, tuple) else args


def _is_sixteen_bit_colour(image: Image.Image) -> bool:
    # Pillow has no 16-bit colour mode; it decodes such files to the high byte and
    # only the tile's raw mode ("RGB;16B" etc.) tells they carried 16 bits.
    return image.mode in ("RGB", "RGBA") and any(
        _SIXTEEN_BIT_COLOUR_RAWMODE.match(str(_rawmode(tile))) for tile in image.tile
    )


def _sixteen_bit_colour(image: Image.Image, data: bytes) -> np.ndarray:
    """Both bytes of a 16-bit colour image, via Pillow's own unfiltering.

    Decoding the same tiles with the opposite byte order yields the low bytes,
    since the unpackers differ only in which byte of each sample they keep.
    """
    high = np.asarray(image).astype(np.uint16)
    twin = _open(data)
    twin.tile = [_swapped_byte_order(tile) for tile in twin.tile]
    low = np.asarray(twin).astype(np.uint16)
    return (high << 8) | low


def _swapped_byte_order(tile):
    native = "L" if sys.byteorder == "little" else "B"
    opposite = {"B": "L", "L": "B", "N": "B" if native == "L" else "L"}
    rawmode = _rawmode(tile)
    swapped = rawmode[:-1] + opposite[rawmode[-1]]
    args = (swapped, *tile.args[1:]) if isinstance(tile.args, tuple) else swapped
    return tile._replace(args=args)


def apply_orientation(pixels: np.ndarray, orientation) -> np.ndarray:
    """Rotate/flip an H x W x C array as EXIF orientation 1..8 prescribes; any other value is no-op."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    transform = transforms.get(_orientation_number(orientation))
    return transform(pixels) if transform else pixels


def _orientation_number(value) -> int | None:
    """The tag as an integer, or None where it is text, bytes, a tuple or a fraction (a malformed tag)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 to float32 in [0, 1] (full-scale of the stored bit depth)."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255)
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / np.float32(65535)
    raise TypeError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")


def _quantize(values: np.ndarray, dtype) -> np.ndarray:
    full_scale = np.iinfo(dtype).max
    return np.clip(np.rint(np.asarray(values, np.float32) * full_scale), 0, full_scale).astype(dtype)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Float in [0, 1] to uint8, rounding to nearest and clipping out-of-range values."""
    return _quantize(values, np.uint8)


def to_uint16(values: np.ndarray) -> np.ndarray:
    """Float in [0, 1] to uint16, rounding to nearest and clipping out-of-range values."""
    return _quantize(values, np.uint16)


def reduce_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint16 to uint8 with rounding; uint8 passes through."""
    if pixels.dtype == np.uint8:
        return pixels
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def encode_png(pixels: np.ndarray, *, compress_level: int = 6) -> bytes:
    """Lossless PNG of an H x W x 3 uint8 or uint16 array."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 pixels, got shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, "PNG", compress_level=compress_level)
        return buffer.getvalue()
    if pixels.dtype == np.uint16:
        return _encode_png16(pixels, compress_level)
    raise TypeError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encode_png16(pixels: np.ndarray, compress_level: int) -> bytes:
    # Pillow cannot write 16-bit colour PNG; the format is simple enough to write here.
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(height, width * 6)
    up_filtered = np.diff(rows, axis=0, prepend=np.zeros((1, rows.shape[1]), np.uint8))
    scanlines = np.concatenate([np.full((height, 1), 2, np.uint8), up_filtered], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), compress_level))
        + _png_chunk(b"IEND", b"")
    )


def decode_png_float(data: bytes) -> np.ndarray:
    """Shard PNG bytes straight to float32 H x W x 3 in [0, 1]."""
    return to_float(decode_image(data))
