"""One optimisation step of the interpolation diffusion, and the EMA it updates (no Ray, S3 or MLflow).

``pipeline.train``'s worker loop runs ``train_step`` under Ray and DDP; the benchmarks and
``tests/test_training_denoises.py`` call the same function in plain loops, so what they
measure and test is the step that ships, not a copy of it.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from pipeline.diffusion import training_loss

__all__ = ["train_step", "update_ema"]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, *, decay: float, step: int) -> None:
    """EMA with a short warm-up, so a run of a few hundred steps exports trained weights, not the init."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_step(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    T: int,
    bare_model: torch.nn.Module | None = None,
    kind: str = "charbonnier",
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    grad_clip: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: torch.nn.Module | None = None,
    ema_decay: float | None = None,
    step: int | None = None,
    autocast: ContextManager | None = None,
) -> torch.Tensor:
    """The training step: loss, zero_grad, backward, clipping, optimizer, schedule, EMA; the detached loss.

    ``model`` is what the forward pass runs (a DDP wrapper in the trainer, so backward
    all-reduces the gradients); ``bare_model`` (default: ``model``) is the module whose
    parameters are clipped and averaged into ``ema``. ``autocast`` (e.g. a bf16
    ``torch.autocast``) covers the forward pass and the loss only. ``grad_clip``,
    ``scheduler`` and ``ema`` are each skipped when None; ``ema`` needs ``ema_decay`` and
    ``step``, the number of steps taken before this one (the EMA warm-up counts from it).
    """
    if ema is not None and (ema_decay is None or step is None):
        raise ValueError("an EMA update needs ema_decay and step")
    bare = model if bare_model is None else bare_model
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = training_loss(model.train(), clean, noisy, T=T, kind=kind, weights=weights, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(bare.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        update_ema(ema, bare, decay=ema_decay, step=step)
    return loss.detach()
