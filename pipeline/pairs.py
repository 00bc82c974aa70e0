"""Finding, loading and validating clean/noisy pairs in the supported layouts.

Works on any fsspec filesystem given ``(fs, root)``: a local folder and an S3
prefix are handled by the same code.  Nothing here writes to the source.

Discovery only lists names (cheap, even for thousands of S3 objects); pixels are
checked when a pair is loaded, so a bad file costs one pair, not the whole job.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

import numpy as np

from pipeline.errors import PipelineError
from pipeline.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, reduce_to_uint8

LAYOUTS = ("sidd", "sidd-mat", "mirrored", "manifest", "clean")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm", ".pnm"}
)
SIDD_MAT_CLEAN = "ValidationGtBlocksSrgb.mat"
SIDD_MAT_NOISY = "ValidationNoisyBlocksSrgb.mat"

MetaValue = Union[str, int, float]

_SIDD_FOLDER = re.compile(
    r"^(?P<scene_instance>\d+)_(?P<scene>\d+)_(?P<camera>[A-Za-z0-9]+)_(?P<iso>\d+)"
    r"_(?P<shutter>\d+)_(?P<illuminant>\d+)_(?P<brightness>[LNH])$"
)
_SIDD_FILE = re.compile(r"^\d+_(?P<side>GT|NOISY)_SRGB_(?P<capture>\d+)\.png$", re.IGNORECASE)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class EmptySourceError(PipelineError, ValueError):
    """The source root lists no files: a wrong path or prefix, usually.

    On S3 a missing prefix and an empty one look the same, so both end up here.
    """


@dataclass
class Pair:
    """One training pair as found in the source; pixels are read by :func:`load_pair`."""

    key: str
    clean_path: str
    noisy_path: str | None  # None: clean-only source, noise is synthesized later
    meta: dict[str, MetaValue] = field(default_factory=dict)
    split: str | None = None  # fixed by the source (manifest column); else hashed
    group: str | None = None  # pairs of one group always share a split
    block: tuple[int, int] | None = None  # (image, block) inside block arrays (sidd-mat)

    @property
    def split_group(self) -> str:
        return self.group if self.group is not None else self.key


@dataclass
class Rejected:
    """A source file (or manifest row) left out, and why."""

    path: str
    reason: str


def discover(
    fs,
    root: str,
    layout: str,
    *,
    clean_template: str | None = None,
    noisy_template: str | None = None,
) -> tuple[list[Pair], list[Rejected]]:
    """All pairs under ``root`` in the given layout, and what was left out.

    Both lists are sorted (pairs by key, rejections by path) so the result does
    not depend on listing order.  Raises :class:`EmptySourceError` when the root
    holds no files at all.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if (clean_template or noisy_template) and layout != "mirrored":
        raise ValueError("filename templates apply to the 'mirrored' layout only")
    root = fs._strip_protocol(root).rstrip("/")
    if layout == "sidd":
        pairs, rejected = _discover_sidd(fs, root)
    elif layout == "sidd-mat":
        pairs, rejected = _discover_sidd_mat(fs, root)
    elif layout == "mirrored":
        pairs, rejected = _discover_mirrored(fs, root, clean_template, noisy_template)
    elif layout == "manifest":
        pairs, rejected = _discover_manifest(fs, root)
    else:
        pairs, rejected = _discover_clean(fs, root)
    pairs, duplicates = _unique_keys(pairs)
    rejected += duplicates
    return sorted(pairs, key=lambda p: p.key), sorted(rejected, key=lambda r: (r.path, r.reason))


# -- listing helpers ---------------------------------------------------------------


def _list_files(fs, root: str) -> list[str]:
    """Paths relative to root of every file below it, hidden files and folders skipped."""
    if not fs.isdir(root):
        return []
    relative = (posixpath.relpath(path, root) for path in fs.find(root))
    return sorted(r for r in relative if not any(part.startswith(".") for part in r.split("/")))


def _list_or_fail(fs, root: str) -> list[str]:
    files = _list_files(fs, root)
    if not files:
        raise EmptySourceError(f"no files under {root!r} (missing or empty)")
    return files


def _is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _not_an_image(path: str) -> Rejected:
    extension = posixpath.splitext(path)[1]
    what = f"extension {extension!r}" if extension else "no extension"
    return Rejected(path, f"not an image file ({what})")


def _strip_extension(path: str) -> str:
    return posixpath.splitext(path)[0]


def _pair_up(
    clean: Mapping[str, str],
    noisy: Mapping[str, str],
    *,
    meta: Mapping[str, dict] | None = None,
    group: Mapping[str, str] | None = None,
) -> tuple[list[Pair], list[Rejected]]:
    """Join clean and noisy files by key; a key on one side only is unpaired."""
    pairs = [
        Pair(key, clean[key], noisy[key], dict((meta or {}).get(key, {})), group=(group or {}).get(key))
        for key in sorted(clean.keys() & noisy.keys())
    ]
    rejected = [Rejected(clean[k], "unpaired: no noisy counterpart") for k in clean.keys() - noisy.keys()]
    rejected += [Rejected(noisy[k], "unpaired: no clean counterpart") for k in noisy.keys() - clean.keys()]
    return pairs, rejected


def _claim_key(side: dict[str, str], key: str, path: str, rejected: list[Rejected]) -> None:
    """Record a file under its key unless another file of the same side holds it."""
    if key in side:
        rejected.append(Rejected(path, f"duplicate key {key!r} (kept {side[key]})"))
    else:
        side[key] = path


def _unique_keys(pairs: list[Pair]) -> tuple[list[Pair], list[Rejected]]:
    """Keys name rows in the shards, so they must be unique; later duplicates lose."""
    kept: dict[str, Pair] = {}
    rejected = []
    for pair in sorted(pairs, key=lambda p: (p.key, p.clean_path)):
        if pair.key in kept:
            reason = f"duplicate key {pair.key!r} (kept {kept[pair.key].clean_path})"
            rejected.append(Rejected(pair.clean_path, reason))
        else:
            kept[pair.key] = pair
    return list(kept.values()), rejected


# -- layouts -----------------------------------------------------------------------


def parse_sidd_folder(name: str) -> dict[str, MetaValue] | None:
    """Capture settings encoded in a SIDD scene folder name, or None if it is not one."""
    match = _SIDD_FOLDER.match(name)
    if match is None:
        return None
    meta: dict[str, MetaValue] = match.groupdict()
    for number in ("iso", "shutter", "illuminant"):
        meta[number] = int(meta[number])
    return meta


def _discover_sidd(fs, root: str) -> tuple[list[Pair], list[Rejected]]:
    data_root = f"{root}/Data" if fs.isdir(f"{root}/Data") else root
    sides: dict[str, dict[str, str]] = {"GT": {}, "NOISY": {}}
    meta: dict[str, dict] = {}
    group: dict[str, str] = {}
    rejected: list[Rejected] = []
    bad_folders: set[str] = set()
    for relative in _list_or_fail(fs, data_root):
        path = f"{data_root}/{relative}"
        folder, _, name = relative.rpartition("/")
        if not _is_image_name(name):
            rejected.append(_not_an_image(path))
            continue
        folder_meta = parse_sidd_folder(folder)
        if folder_meta is None:
            if folder not in bad_folders:
                bad_folders.add(folder)
                reason = f"not a SIDD scene folder name: {folder!r}"
                rejected.append(Rejected(f"{data_root}/{folder}", reason))
            continue
        file_match = _SIDD_FILE.match(name)
        if file_match is None:
            reason = "not a SIDD sRGB file name (<n>_GT_SRGB_<k>.PNG / <n>_NOISY_SRGB_<k>.PNG)"
            rejected.append(Rejected(path, reason))
            continue
        key = f"{folder}_{file_match['capture']}"
        _claim_key(sides[file_match["side"].upper()], key, path, rejected)
        meta[key] = folder_meta
        group[key] = folder  # both captures of one scene folder go to the same split
    pairs, unpaired = _pair_up(sides["GT"], sides["NOISY"], meta=meta, group=group)
    return pairs, rejected + unpaired


def _template_pattern(template: str) -> re.Pattern:
    if template.count("{key}") != 1 or "/" in template:
        raise ValueError(f"a filename template needs exactly one {{key}} and no '/': {template!r}")
    before, after = template.split("{key}")
    return re.compile(f"^{re.escape(before)}(?P<key>.+){re.escape(after)}$", re.IGNORECASE)


def _key_by_template(relative: str, pattern: re.Pattern | None) -> str | None:
    folder, _, name = relative.rpartition("/")
    if pattern is None:
        return _strip_extension(relative)
    match = pattern.match(name)
    if match is None:
        return None
    return f"{folder}/{match['key']}" if folder else match["key"]


def _discover_mirrored(fs, root: str, clean_template: str | None, noisy_template: str | None):
    templates = {"clean": clean_template, "noisy": noisy_template}
    patterns = {side: _template_pattern(t) if t else None for side, t in templates.items()}
    side_by_side = any(templates.values()) and not (fs.isdir(f"{root}/clean") or fs.isdir(f"{root}/noisy"))
    if side_by_side and not all(templates.values()):
        raise ValueError("pairing files side by side (no clean/ and noisy/ folders) needs both templates")
    listings = (
        {"": _list_or_fail(fs, root)}
        if side_by_side
        else {side: _list_files(fs, f"{root}/{side}") for side in ("clean", "noisy")}
    )
    if not any(listings.values()):
        raise EmptySourceError(f"no files under {root!r}/clean or {root!r}/noisy (missing or empty)")
    # With both sides in one folder, try the more specific template first.
    side_order = sorted(patterns, key=lambda side: -len(templates[side] or ""))
    found: dict[str, dict[str, str]] = {"clean": {}, "noisy": {}}
    rejected = []
    for folder, relatives in listings.items():
        for relative in relatives:
            path = posixpath.join(root, folder, relative)
            if not _is_image_name(relative):
                rejected.append(_not_an_image(path))
                continue
            for side in side_order if side_by_side else [folder]:
                key = _key_by_template(relative, patterns[side])
                if key is not None:
                    _claim_key(found[side], key, path, rejected)
                    break
            else:
                tried = [t for t in templates.values() if t] if side_by_side else [templates[folder]]
                wanted = " or ".join(repr(t) for t in tried)
                rejected.append(Rejected(path, f"name does not match template {wanted}"))
    pairs, unpaired = _pair_up(found["clean"], found["noisy"])
    return pairs, rejected + unpaired


def _find_manifest(fs, root: str) -> str:
    if fs.isfile(f"{root}/manifest.csv"):
        return f"{root}/manifest.csv"
    if not fs.isdir(root):
        raise EmptySourceError(f"no manifest at {root!r} (missing)")
    candidates = sorted(p for p in fs.ls(root, detail=False) if p.lower().endswith(".csv"))
    if not candidates:
        raise EmptySourceError(f"no manifest CSV in {root!r}")
    if len(candidates) > 1:
        listed = ", ".join(candidates)
        raise PipelineError(f"several CSV files in {root!r} ({listed}); pass the manifest itself as root")
    return candidates[0]


def _resolve_manifest_path(fs, base: str, written: str) -> str:
    """Relative paths are relative to the manifest's folder; URIs must be on ``fs``."""
    if "://" in written:
        protocol = written.split("://", 1)[0]
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if protocol not in protocols:
            raise ValueError(f"path on another filesystem ({protocol}://): {written}")
        return fs._strip_protocol(written)
    if written.startswith("/"):
        return written
    return posixpath.normpath(posixpath.join(base, written))


def _meta_value(text: str) -> MetaValue:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _discover_manifest(fs, root: str) -> tuple[list[Pair], list[Rejected]]:
    manifest = root if root.lower().endswith(".csv") else _find_manifest(fs, root)
    if not fs.isfile(manifest):
        raise EmptySourceError(f"no manifest at {manifest!r} (missing)")
    base = posixpath.dirname(manifest)
    with fs.open(manifest, "rb") as handle:
        text = handle.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if not {"clean", "noisy"} <= set(columns):
        raise PipelineError(f"manifest {manifest!r} needs 'clean' and 'noisy' columns, has {columns}")
    pairs, rejected = [], []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        where = f"{manifest}:{line}"
        split = row.pop("split", "") or None
        key = row.pop("key", "")
        clean, noisy = row.pop("clean"), row.pop("noisy")
        if not clean or not noisy:
            rejected.append(Rejected(where, f"missing {'clean' if not clean else 'noisy'} path"))
            continue
        if split not in (None, "train", "val"):
            rejected.append(Rejected(where, f"unknown split {split!r} (expected train or val)"))
            continue
        try:
            clean_path = _resolve_manifest_path(fs, base, clean)
            noisy_path = _resolve_manifest_path(fs, base, noisy)
        except ValueError as exc:
            rejected.append(Rejected(where, str(exc)))
            continue
        key = key or _strip_extension(clean.split("://", 1)[-1].lstrip("/"))
        meta = {name: _meta_value(value) for name, value in row.items() if name and value}
        pairs.append(Pair(key, clean_path, noisy_path, meta, split=split))
    return pairs, rejected


def _discover_clean(fs, root: str) -> tuple[list[Pair], list[Rejected]]:
    pairs, rejected = [], []
    for relative in _list_or_fail(fs, root):
        path = f"{root}/{relative}"
        if _is_image_name(relative):
            pairs.append(Pair(_strip_extension(relative), path, None))
        else:
            rejected.append(_not_an_image(path))
    return pairs, rejected


# -- SIDD validation block arrays ----------------------------------------------------


def _mat_variable(path: str) -> str:
    # SIDD names each .mat file after the one array it holds.
    return _strip_extension(posixpath.basename(path))


def _is_hdf5(fs, path: str) -> bool:
    with fs.open(path, "rb") as handle:
        handle.seek(512)  # MATLAB v7.3 files are HDF5 with a 512-byte MATLAB preamble
        return handle.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE


def _h5py(path: str):
    try:
        import h5py
    except ImportError:
        raise PipelineError(
            f"{path} is a MATLAB v7.3 (HDF5) file; install h5py to read it, "
            "or re-save it with MATLAB's '-v7' option"
        ) from None
    return h5py


def _mat_shape(fs, path: str) -> tuple[int, ...] | None:
    variable = _mat_variable(path)
    if _is_hdf5(fs, path):
        with fs.open(path, "rb") as handle, _h5py(path).File(handle, "r") as mat:
            return tuple(reversed(mat[variable].shape)) if variable in mat else None
    import scipy.io

    with fs.open(path, "rb") as handle:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(handle)}
    return shapes.get(variable)


@functools.lru_cache(maxsize=2)
def _mat_blocks(fs, path: str) -> np.ndarray:
    """The whole block array of one file; cached because pairs load it block by block."""
    variable = _mat_variable(path)
    if _is_hdf5(fs, path):
        with fs.open(path, "rb") as handle, _h5py(path).File(handle, "r") as mat:
            return np.transpose(mat[variable][()])  # HDF5 stores MATLAB arrays axis-reversed
    import scipy.io

    with fs.open(path, "rb") as handle:
        return scipy.io.loadmat(handle, variable_names=[variable])[variable]


def _discover_sidd_mat(fs, root: str) -> tuple[list[Pair], list[Rejected]]:
    folder = posixpath.dirname(root) if root.lower().endswith(".mat") else root
    clean_path, noisy_path = f"{folder}/{SIDD_MAT_CLEAN}", f"{folder}/{SIDD_MAT_NOISY}"
    present = {path: fs.isfile(path) for path in (clean_path, noisy_path)}
    if not any(present.values()):
        raise EmptySourceError(f"neither {SIDD_MAT_CLEAN} nor {SIDD_MAT_NOISY} under {folder!r}")
    if not present[noisy_path]:
        return [], [Rejected(clean_path, f"unpaired: no noisy counterpart ({SIDD_MAT_NOISY})")]
    if not present[clean_path]:
        return [], [Rejected(noisy_path, f"unpaired: no clean counterpart ({SIDD_MAT_CLEAN})")]
    shapes = {path: _mat_shape(fs, path) for path in (clean_path, noisy_path)}
    for path, shape in shapes.items():
        if shape is None:
            return [], [Rejected(path, f"no variable {_mat_variable(path)!r} in file")]
        if len(shape) != 5 or shape[-1] != 3:
            return [], [Rejected(path, f"expected images x blocks x H x W x 3 array, got shape {shape}")]
    if shapes[clean_path] != shapes[noisy_path]:
        reason = f"shape mismatch: clean {shapes[clean_path]} vs noisy {shapes[noisy_path]}"
        return [], [Rejected(noisy_path, reason)]
    images, blocks = shapes[clean_path][:2]
    pairs = [
        Pair(
            f"{image:02d}_{block:02d}",
            clean_path,
            noisy_path,
            {"image": image, "block": block},
            group=f"{image:02d}",  # blocks of one photo share a split
            block=(image, block),
        )
        for image in range(images)
        for block in range(blocks)
    ]
    return pairs, []


# -- loading and validation ----------------------------------------------------------


def _decode_side(data: bytes, side: str, max_pixels: int) -> np.ndarray:
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise exc.on_side(side) from None


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]}"


def _check_min_size(pixels: np.ndarray, min_size: int, side: str = "") -> None:
    if min(pixels.shape[:2]) < min_size:
        prefix = f"{side}: " if side else ""
        raise ImageError(f"{prefix}too small: {_size(pixels)} < patch size {min_size}")


def check_pair(clean: np.ndarray, noisy: np.ndarray, *, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned sizes, large enough for a patch, one bit depth (8-bit if the sides differ)."""
    if clean.shape != noisy.shape:
        raise ImageError(f"size mismatch: clean {_size(clean)} vs noisy {_size(noisy)}")
    _check_min_size(clean, min_size)
    if clean.dtype != noisy.dtype:
        return reduce_to_uint8(clean), reduce_to_uint8(noisy)
    return clean, noisy


def validate_pair(
    clean_bytes: bytes, noisy_bytes: bytes, *, min_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Decode both sides of a pair and check they can train together."""
    clean = _decode_side(clean_bytes, "clean", max_pixels)
    noisy = _decode_side(noisy_bytes, "noisy", max_pixels)
    return check_pair(clean, noisy, min_size=min_size)


def validate_clean(clean_bytes: bytes, *, min_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a clean-only image and check it is large enough for a patch."""
    clean = _decode_side(clean_bytes, "clean", max_pixels)
    _check_min_size(clean, min_size, "clean")
    return clean


def _read(fs, path: str, side: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ImageError(f"{side}: file not found") from None


def load_pair(
    fs, pair: Pair, *, min_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated pixels of a pair, whatever its layout: ``(clean, noisy or None)``.

    Raises :class:`ImageError` for anything that belongs in quarantine; other
    errors (network, permissions) propagate so the caller can retry.
    """
    if pair.block is not None:
        image, block = pair.block
        clean = _mat_blocks(fs, pair.clean_path)[image, block]
        noisy = _mat_blocks(fs, pair.noisy_path)[image, block]
        return check_pair(np.ascontiguousarray(clean), np.ascontiguousarray(noisy), min_size=min_size)
    clean_bytes = _read(fs, pair.clean_path, "clean")
    if pair.noisy_path is None:
        return validate_clean(clean_bytes, min_size=min_size, max_pixels=max_pixels), None
    noisy_bytes = _read(fs, pair.noisy_path, "noisy")
    return validate_pair(clean_bytes, noisy_bytes, min_size=min_size, max_pixels=max_pixels)


# -- splits and hashes -----------------------------------------------------------------


def split_for(key: str, val_fraction: float, seed: int) -> str:
    """'train' or 'val' from a hash of (seed, key): stable when files are added or reordered."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def resolve_split(pair: Pair, val_fraction: float, seed: int) -> str:
    """The source's own split if it fixes one, else the hashed split of the pair's group."""
    return pair.split or split_for(pair.split_group, val_fraction, seed)


def pair_hash(clean_png: bytes, noisy_png: bytes | None) -> str:
    """Content hash of one stored pair (length-prefixed, so sides cannot blur together)."""
    digest = hashlib.blake2b(digest_size=32)
    for side in (clean_png, noisy_png):
        if side is None:
            digest.update(b"\xff" * 8)
        else:
            digest.update(len(side).to_bytes(8, "big"))
            digest.update(side)
    return digest.hexdigest()


def dataset_hash(pair_hashes: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """Hash of a whole dataset from its ``key -> pair_hash`` entries, in any order."""
    items = list(pair_hashes.items() if isinstance(pair_hashes, Mapping) else pair_hashes)
    entries = dict(items)
    if len(entries) != len(items):
        raise ValueError("dataset_hash got the same key twice")
    digest = hashlib.blake2b(digest_size=32)
    for key in sorted(entries):
        digest.update(f"{key}\t{entries[key]}\n".encode())
    return digest.hexdigest()
