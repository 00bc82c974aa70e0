"""The training job's one typed config: a YAML file plus ``--set key=value`` overrides.

Everything is validated here, before any cluster work, so a typo or a wrong type is one
readable line instead of a failed run ten minutes later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.diffusion import DEFAULT_STEPS, SAMPLERS
from pipeline.errors import PipelineError, validation_problems
from pipeline.model import CHANNEL_ATTENTION, PRESETS, TIME_CONDITIONING, ModelConfig
from pipeline.settings import read_yaml_mapping
from pipeline.shards import CHANNEL_SHUFFLES


class ConfigError(PipelineError, ValueError):
    """A config file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseSection(Section):
    """Camera noise synthesized by the reader for clean photos (pipeline/noise.py)."""

    model: Literal["train"] = Field("train", description="camera model the noise is drawn from; the held-out "
                                    "'test' camera is never trained on")
    seed: int | None = Field(None, description="fixed noise (same noise for the same crop); null = new noise "
                             "on every read")


class DataConfig(Section):
    patch_size: int = Field(64, ge=8, description="side of the square training crops")
    crops_per_image: int = Field(8, ge=1, description="random aligned crops per training pair and epoch")
    seed: int | None = Field(None, description="fixed crop stream (same patches every epoch); null = fresh crops")
    noise: NoiseSection = NoiseSection()
    synthetic: str | None = Field(None, description="a dataset of clean photos (ingest --noise fresh) mixed into "
                                  "training with fresh camera noise on every crop")
    synthetic_weight: float = Field(0.5, ge=0, le=1, description="share of training patches from data.synthetic")
    channel_shuffle: Literal[CHANNEL_SHUFFLES] = Field(  # type: ignore[valid-type]
        "none", description="give each crop's clean and noisy sides one random channel order, so more hues "
        "are seen: 'all' (any order of R, G, B), 'red-blue' (R and B swapped in half the crops; G, the "
        "least noisy channel of a Bayer camera, stays), 'none'; true/false mean 'all'/'none'")
    shuffle_buffer: int = Field(0, ge=0, description="patches in each worker's local shuffle buffer (0: off); "
                                "mixes crops of different photos and datasets into one batch")

    @field_validator("channel_shuffle", mode="before")
    @classmethod
    def _shuffle_from_bool(cls, value):
        """Configs written when this was a switch keep their meaning."""
        return {True: "all", False: "none"}.get(value, value) if isinstance(value, bool) else value


class ModelSection(Section):
    preset: Literal[tuple(PRESETS)] = "tiny"  # type: ignore[valid-type]
    width: int | None = Field(None, ge=1, description="override the preset's base channel width")
    time_conditioning: Literal[TIME_CONDITIONING] | None = Field(  # type: ignore[valid-type]
        None, description="naf blocks: override how t enters ('shift' adds it before the gates, 'scale' "
        "multiplies the gated features)")
    channel_attention: Literal[CHANNEL_ATTENTION] | None = Field(  # type: ignore[valid-type]
        None, description="naf blocks: override the channel attention ('linear' or bounded 'sigmoid')")
    output_norm: bool | None = Field(None, description="override the LayerNorm before the last conv")
    mid_blocks: int | None = Field(None, ge=2, description="override the number of blocks at the lowest resolution")

    def unet_config(self) -> ModelConfig:
        overrides = {name: value for name, value in self.model_dump(exclude={"preset"}).items() if value is not None}
        base = PRESETS[self.preset]
        return ModelConfig(**{**base.to_dict(), **overrides}) if overrides else base


class DiffusionConfig(Section):
    T: int = Field(1000, ge=1, description="number of interpolation steps between clean and noisy")
    loss: Literal["charbonnier", "l1", "l2"] = "charbonnier"
    time_mass_at_T: float = Field(0.0, ge=0, le=1, description="share of training times drawn at t = T, where "
                                  "every sampler makes its first call; the rest uniform on 1..T")


class OptimizerConfig(Section):
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to lr")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null disables")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights used for validation and export")
    ema_half_life: float | None = Field(None, gt=0, le=1, description="EMA half-life as a share of the run's "
                                        "steps; replaces ema_decay so the average spans the same part of any run")

    def ema_decay_for(self, total_steps: int) -> float:
        """The per-step EMA decay: ``ema_decay``, or 0.5 ** (1 / (ema_half_life * total_steps))."""
        if self.ema_half_life is None:
            return self.ema_decay
        return 0.5 ** (1.0 / max(1.0, self.ema_half_life * total_steps))


class TrainSection(Section):
    batch_size: int = Field(16, ge=1, description="patches per worker and step")
    steps: int | None = Field(None, ge=1, description="optimizer steps in total (or give epochs)")
    epochs: int | None = Field(None, ge=1, description="passes over the patches (or give steps)")
    seed: int = 0
    log_every: int = Field(25, ge=1, description="steps between progress lines and MLflow flushes")
    bf16: bool = Field(False, description="bf16 autocast when training on GPU (ignored on CPU); off by default: "
                                            "slower than fp32 at 16 patches per GPU (docs/training.md)")
    threads_per_worker: int | None = Field(None, ge=1, description="torch CPU threads; default: the worker's CPUs")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSection":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps and train.epochs (set the other to null)")
        return self


class ValidationConfig(Section):
    every_steps: int = Field(200, ge=1, description="steps between validations (and the last step)")
    sampler: Literal[tuple(SAMPLERS)] = "improved"  # type: ignore[valid-type]
    sampler_steps: int = Field(DEFAULT_STEPS, ge=1, description="K: sampling steps of the configured sampler")
    crop: int | None = Field(128, ge=8, description="centre crop of each validation pair; null = whole image")
    limit: int | None = Field(8, ge=1, description="validation pairs used; null = all")


class CheckpointSection(Section):
    every_steps: int = Field(200, ge=1, description="steps between checkpoints; a multiple of validation.every_steps")
    num_to_keep: int = Field(2, ge=1, description="best checkpoints kept by val_psnr (the latest is always kept)")


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "SPREAD", description="how the workers' placement group lays them over the nodes: SPREAD puts them on "
                              "different nodes where it can (one node lost costs fewer of them), PACK on as few "
                              "as possible, STRICT_* or not at all")

    @property
    def torch_backend(self) -> str:
        return ("nccl" if self.use_gpu else "gloo") if self.backend == "auto" else self.backend

    @model_validator(mode="after")
    def _backend_fits_device(self) -> "ScalingSection":
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("scaling.backend nccl needs scaling.use_gpu: true")
        if any(v <= 0 for v in self.resources_per_worker.values()):
            raise ValueError("scaling.resources_per_worker amounts must be > 0")
        return self


class MlflowSection(Section):
    experiment: str = Field("denoise", min_length=1)
    registered_model: str = Field("denoiser", min_length=1)


class FaultInjection(Section):
    """Test-only: rank 0 kills its own process once, to exercise restarts from checkpoints."""

    kill_at_step: int | None = Field(None, ge=1, description="step at which rank 0 SIGKILLs itself in a fresh attempt")


class TrainConfig(Section):
    dataset: str = Field(..., min_length=1, description="dataset URI written by jobs/ingest.py (s3:// or a folder)")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
                                 description="Ray Train run name; rerunning with it resumes")
    storage_path: str | None = Field(None, description="where checkpoints go; default s3://BUCKET/checkpoints")
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    diffusion: DiffusionConfig = DiffusionConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainSection
    validation: ValidationConfig = ValidationConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    mlflow: MlflowSection = MlflowSection()
    fault_injection: FaultInjection = FaultInjection()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.checkpoint.every_steps % self.validation.every_steps:
            raise ValueError(f"checkpoint.every_steps ({self.checkpoint.every_steps}) must be a multiple of "
                             f"validation.every_steps ({self.validation.every_steps}): each checkpoint is "
                             f"ranked by its val_psnr")
        if self.validation.sampler_steps > self.diffusion.T:
            raise ValueError(f"validation.sampler_steps ({self.validation.sampler_steps}) must be <= "
                             f"diffusion.T ({self.diffusion.T})")
        kill = self.fault_injection.kill_at_step
        if kill is not None and kill <= self.checkpoint.every_steps:
            raise ValueError("fault_injection.kill_at_step must come after the first checkpoint "
                             f"(> checkpoint.every_steps = {self.checkpoint.every_steps})")
        return self

    def flat(self) -> dict[str, Any]:
        """``{"optimizer.lr": 0.001, ...}``: the config as MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "resources_per_worker":
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-4"`` -> (["optimizer", "lr"], 0.0003); values are YAML scalars."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. optimizer.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``tree`` with each ``key=value`` set; intermediate sections are created as needed."""
    tree = yaml.safe_load(yaml.safe_dump(tree)) or {}  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[:depth + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate; every problem becomes one ConfigError line naming the key."""
    file = Path(path)
    tree = read_yaml_mapping(file, what="config file", error=ConfigError)
    tree = apply_overrides(tree, overrides or [])
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {file}: {validation_problems(exc, where='config')}") from None
