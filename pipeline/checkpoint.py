"""Checkpoint format: ``model.pt`` (a plain state_dict) + ``model.json`` (config, T, version).

The weights file holds tensors only so it loads with ``weights_only=True``;
everything needed to rebuild the network lives in the JSON next to it. The
pair is produced and consumed as ``{name: bytes}`` so storage code (local
disk, object stores) never needs to know what is inside.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.model import ModelConfig, UNet

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "checkpoint_files",
    "load_checkpoint",
    "load_checkpoint_files",
    "save_checkpoint",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"


class CheckpointError(ValueError):
    """A checkpoint that is malformed or does not match what the caller expects."""


def checkpoint_files(model: UNet, *, T: int, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The checkpoint as ``{"model.pt": ..., "model.json": ...}`` bytes."""
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise CheckpointError("model has no ModelConfig in model.config; build it with build_model/UNet")
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buffer)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "T": int(T),
        "extra": extra or {},
    }
    return {WEIGHTS_FILE: buffer.getvalue(), CONFIG_FILE: json.dumps(meta, indent=2, sort_keys=True).encode()}


def load_checkpoint_files(
    files: dict[str, bytes],
    expect: ModelConfig | dict | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the model from checkpoint bytes; returns (model, meta).

    ``meta`` holds ``T``, ``format_version``, ``extra`` and ``model_config``
    (a ModelConfig). Raises CheckpointError if the files are missing or
    malformed, the JSON config differs from ``expect``, or the weights do not
    fit the config.
    """
    missing = {WEIGHTS_FILE, CONFIG_FILE} - set(files)
    if missing:
        raise CheckpointError(f"checkpoint is missing {sorted(missing)}")
    try:
        meta = json.loads(files[CONFIG_FILE])
        version = meta["format_version"]
        config = ModelConfig.from_dict(meta["model_config"])
        T = int(meta["T"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{CONFIG_FILE} is malformed: {exc}") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format_version {version}; this code reads {FORMAT_VERSION}")
    if expect is not None:
        expected = expect if isinstance(expect, ModelConfig) else ModelConfig.from_dict(dict(expect))
        if expected != config:
            diffs = ", ".join(
                f"{k}={v!r} (expected {expected.to_dict()[k]!r})"
                for k, v in config.to_dict().items()
                if expected.to_dict()[k] != v
            )
            raise CheckpointError(f"checkpoint config differs from the expected one: {diffs}")

    try:
        state = torch.load(io.BytesIO(files[WEIGHTS_FILE]), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise CheckpointError(f"{WEIGHTS_FILE} cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    model = UNet(config)
    _check_state_matches(model, state)
    model.load_state_dict(state)
    model.to(map_location)
    return model, {"format_version": version, "model_config": config, "T": T, "extra": meta.get("extra", {})}


def _check_state_matches(model: UNet, state: Any) -> None:
    """One readable line instead of load_state_dict's multi-line report."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{WEIGHTS_FILE} does not hold a state_dict")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches, e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise CheckpointError(f"{WEIGHTS_FILE} does not fit the config in {CONFIG_FILE}: " + "; ".join(parts))


def save_checkpoint(
    target: str | os.PathLike | IO[bytes], model: UNet, *, T: int, extra: dict[str, Any] | None = None
) -> None:
    """Write the checkpoint into a directory, or as a zip archive into a binary file object.

    Files are written under temporary names and renamed, so a crash never
    leaves a half-written checkpoint behind under the final names.
    """
    files = checkpoint_files(model, T=T, extra=extra)
    if hasattr(target, "write"):
        with zipfile.ZipFile(target, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return
    directory = Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)


def load_checkpoint(
    source: str | os.PathLike | IO[bytes],
    expect: ModelConfig | dict | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> tuple[UNet, dict[str, Any]]:
    """Read what :func:`save_checkpoint` wrote (a directory or a zip file object)."""
    names = (WEIGHTS_FILE, CONFIG_FILE)
    if hasattr(source, "read"):
        try:
            with zipfile.ZipFile(source) as archive:
                files = {n: archive.read(n) for n in names if n in archive.namelist()}
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"not a checkpoint archive: {exc}") from None
    else:
        directory = Path(source)
        files = {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}
    return load_checkpoint_files(files, expect, map_location=map_location)
