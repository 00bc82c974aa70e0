"""Trained denoisers in MLflow's registry or as checkpoint folders, behind one URI.

A registered version carries two things: an ``mlflow.pytorch`` model (a module mapping a
noisy batch to a denoised one, for ``mlflow.pyfunc`` users) and our own checkpoint files
(``model.pt`` + ``model.json``) as extra files, which is what the jobs load, with
``torch.load(weights_only=True)``. The served module is pickled (docs/training.md says why) with an
input example and a signature, so the UI and ``mlflow models serve`` know what it takes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_files, load_checkpoint_files
from pipeline.diffusion import DEFAULT_STEPS, SAMPLERS, check_steps, sample
from pipeline.errors import PipelineError, is_transient
from pipeline.model import UNet
from pipeline.settings import Settings
from pipeline.storage import fsspec_for, join
from pipeline.tiling import denoise_tiled, geometric_self_ensemble

DEFAULT_MODEL_URI = "models:/denoiser@champion"
PACKAGE_DIR = Path(__file__).resolve().parent
# What loading the served module imports (what MLflow's inference found). Naming them saves the
# 5-10 s MLflow spends importing the model in a subprocess to infer them, on every registration.
SERVING_PACKAGES = ("mlflow", "numpy", "pandas", "pyarrow", "torch")
# Where the served model's environment finds torch: PyPI's Linux torch is the CUDA build with
# gigabytes of NVIDIA wheels, while pip takes X+cpu from here for ==X (the higher version).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class ModelLoadError(PipelineError):
    """The model URI does not lead to a loadable denoiser."""


@dataclass
class Denoiser:
    model: UNet
    T: int
    uri: str
    name: str | None = None
    version: str | None = None

    def denoise(self, image, *, sampler: str = "improved", steps: int = DEFAULT_STEPS, tile: int = 512,
                overlap: int = 32, batch: int = 4, self_ensemble: bool = False):
        """H x W x 3 float image in [0, 1], any size -> denoised, in tiles on the model's device.

        The one place where jobs turn a photo into a model output, so the batch job and the
        evaluation score exactly the same computation. ``steps`` (K) must be in 1..T. ``self_ensemble``
        runs every model call on the tile's 8 flips and quarter turns and averages them (8x the calls).
        """
        import numpy as np

        check_steps(steps, self.T)

        device = next(self.model.parameters()).device
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().to(device)

        # Ensembling each model call, not whole sampler runs, lets every step go on from the
        # averaged prediction (docs/method.md "Self-ensemble").
        model = geometric_self_ensemble(self.model) if self_ensemble else self.model

        def run(tiles: torch.Tensor) -> torch.Tensor:
            return sample(model, tiles, T=self.T, steps=steps, sampler=sampler)

        with torch.inference_mode():
            out = denoise_tiled(run, pixels, tile=tile, overlap=overlap, batch=batch)
        return out.clamp(0, 1).cpu().numpy().transpose(1, 2, 0)


def serving_requirements() -> list[str]:
    """Pinned to this environment's versions, after an extra index line for CPU torch; torch without
    its local label (``+cpu``), so a CUDA build of the same release, already installed, satisfies it."""
    from importlib.metadata import version

    return [f"--extra-index-url {TORCH_CPU_INDEX}",
            *(f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES)]


def serving_signature():
    """Any number of (3, H, W) float32 images of any size in, the same shapes out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))])
    return ModelSignature(inputs=images, outputs=images)


class SamplingDenoiser(nn.Module):
    """What ``mlflow.pytorch`` serves: noisy (B,3,H,W) in [0,1] -> denoised, with a fixed sampler."""

    def __init__(self, model: UNet, *, T: int, sampler: str = "improved", steps: int = DEFAULT_STEPS):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
        self.model, self.T, self.sampler, self.steps = model, T, sampler, check_steps(steps, T)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return sample(self.model, y, T=self.T, steps=self.steps, sampler=self.sampler).clamp(0, 1)


def log_denoiser(model: UNet, *, T: int, registered_name: str | None = None, artifact_name: str = "model",
                 sampler: str = "improved", steps: int = DEFAULT_STEPS, input_example=None, extra: dict | None = None):
    """Log to the active MLflow run (and register when a name is given); returns the ModelInfo."""
    import mlflow.pytorch
    import numpy as np

    model = model.eval().cpu()
    served = SamplingDenoiser(model, T=T, sampler=sampler, steps=steps)
    if input_example is None:
        input_example = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in checkpoint_files(model, T=T, extra=extra).items():
            (Path(tmp) / name).write_bytes(data)
            paths.append(str(Path(tmp) / name))
        return mlflow.pytorch.log_model(
            served, name=artifact_name, signature=serving_signature(), input_example=input_example,
            registered_model_name=registered_name, extra_files=paths, code_paths=[str(PACKAGE_DIR)],
            pip_requirements=serving_requirements(),
            serialization_format="pickle", await_registration_for=60,
        )


def _registry_version(uri: str, settings: Settings):
    """``models:/name@alias`` or ``models:/name/N`` -> (name, ModelVersion)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/"):]
    client = mlflow.MlflowClient(settings.mlflow_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, client.get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        return name, client.get_model_version(name, version)
    except MlflowException as exc:
        detail = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        raise ModelLoadError(f"cannot resolve {uri} in the MLflow registry at {settings.mlflow_uri}: {detail}",
                             transient=is_transient(exc)) from None


def _files_from_folder(fs, root: str) -> dict[str, bytes]:
    found = {}
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = join(root, name)
        if fs.exists(path):
            found[name] = fs.cat_file(path)
    return found


def load_denoiser(uri: str = DEFAULT_MODEL_URI, settings: Settings | None = None) -> Denoiser:
    """Load from the registry (``models:/...``) or a checkpoint folder (s3:// or local)."""
    import mlflow

    settings = settings or Settings()
    name = version = None
    try:
        if uri.startswith("models:/"):
            name, mv = _registry_version(uri, settings)
            version = str(mv.version)
            mlflow.set_tracking_uri(settings.mlflow_uri)
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
                hits = sorted(Path(local).rglob(CONFIG_FILE))
                if not hits:
                    raise ModelLoadError(f"{uri} (version {version}) has no {CONFIG_FILE}; was it logged by log_denoiser?")
                files = _files_from_folder(fsspec_for(str(hits[0].parent), settings)[0], str(hits[0].parent))
        else:
            fs, root = fsspec_for(uri, settings)
            files = _files_from_folder(fs, root)
            if not files:
                raise ModelLoadError(f"no checkpoint ({WEIGHTS_FILE} + {CONFIG_FILE}) at {uri}")
        model, meta = load_checkpoint_files(files)
    except CheckpointError as exc:
        raise ModelLoadError(f"cannot load {uri}: {exc}") from None
    except ModelLoadError:
        raise
    except Exception as exc:  # network, permissions, MLflow: one line naming the URI
        raise ModelLoadError(f"cannot load {uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             transient=is_transient(exc)) from None
    return Denoiser(model=model.eval(), T=meta["T"], uri=uri, name=name, version=version)


#: Run params that must agree before two runs' val_psnr say anything about each other:
#: the data (by content) and how validation scored it.
COMPARABLE_PARAMS = ("dataset_hash", "validation.sampler", "validation.sampler_steps", "validation.crop",
                     "validation.limit")


def comparability_problem(candidate: dict, current: dict, *, keys=COMPARABLE_PARAMS) -> str | None:
    """Why two runs' params make their scores incomparable, or None when they agree on ``keys``."""
    # "None" is a real setting for validation.crop/limit (whole images, all pairs), not for the hash.
    unknown = [k for k in keys if k not in candidate or k not in current
               or (k == "dataset_hash" and "None" in (str(candidate[k]), str(current[k])))]
    if unknown:
        return f"{', '.join(unknown)} not recorded on both runs"
    differ = [f"{k} {current[k]} -> {candidate[k]}" for k in keys if candidate[k] != current[k]]
    return f"measured differently ({'; '.join(differ)})" if differ else None


def promote(name: str, version: str | int, *, metric: str = "val_psnr", alias: str = "champion",
            settings: Settings | None = None) -> dict:
    """Move ``alias`` to ``version`` only if its run's ``metric`` beats the current holder's, measured
    the same way (same dataset hash and validation settings); otherwise the alias stays and
    ``reason`` says why."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient((settings or Settings()).mlflow_uri)

    def run_of(mv):
        return client.get_run(mv.run_id) if mv.run_id else None

    candidate = client.get_model_version(name, str(version))
    candidate_run = run_of(candidate)
    new = candidate_run.data.metrics.get(metric) if candidate_run else None
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    current_run = run_of(current) if current else None
    old = current_run.data.metrics.get(metric) if current_run else None
    old_version = current.version if current else None

    reason = None
    if new is None:
        reason = f"version {version} has no {metric}"
    elif current is not None and str(current.version) == str(version):
        reason = f"version {version} already is {alias}"
    elif current is not None:
        problem = comparability_problem(candidate_run.data.params, current_run.data.params if current_run else {})
        if problem:
            reason = f"{metric} of version {version} and version {old_version} are not comparable: {problem}"
        elif old is not None and new <= old:
            reason = f"{metric} {new:.4f} does not beat {old:.4f}"
    promoted = reason is None
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
    return {"promoted": promoted, "alias": alias, "metric": metric, "candidate_version": str(version),
            "candidate_score": new, "previous_version": old_version, "previous_score": old, "reason": reason}
