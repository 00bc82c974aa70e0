"""Interpolation diffusion between a clean image x0 and its noisy photo xT.

Forward process (no Gaussian noise is added; the real noise of the photo is
the "terminal state"):

    D(x0, xT, t) = (1 - t/T) * x0 + (t/T) * xT,   t in {0, ..., T}

Training draws t from {1..T} and teaches S(D(x0, y, t), t/T) to return x0.
Sampling starts from the photo y at t = T and walks down to 0 in K steps,
1 <= K <= T (DEFAULT_STEPS unless given); each step is one model call at an
integer time in {1..T}, the times training drew.

Sampler identity (why ``improved`` is stable): its update is

    x_{t'} = x_t - D(x0_hat, y, t) + D(x0_hat, y, t') = x_t + (t - t')/T * (x0_hat - y)

so, starting at x_T = y, the result is

    x_0 = y + sum_k (dt_k / T) * (x0_hat_k - y) = sum_k (dt_k / T) * x0_hat_k,

a weighted mean of the K predictions with weights dt_k / T that sum to one
(an exact mean when K divides T). ``origin`` instead returns the last
prediction alone. ``indi`` (the update of Delbracio & Milanfar's InDI)
re-estimates the noisy endpoint from x_t instead of using y,
y_hat = (x_t - (1 - t/T) x0_hat) / (t/T), and moves to D(x0_hat, y_hat, t'):

    x_{t'} = (t'/t) * x_t + (1 - t'/t) * x0_hat

(docs/method.md derives what that does to the noise in x_t). With a perfect
denoiser every sampler returns x0 exactly, and with K = 1 every sampler is
``direct``.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_STEPS",
    "SAMPLERS",
    "Denoiser",
    "check_steps",
    "degrade",
    "interpolate",
    "reconstruction_loss",
    "sample",
    "sample_timesteps",
    "time_weights",
    "timestep_schedule",
    "training_loss",
]

#: Anything with the UNet's signature: (x_t, t/T as a (B,) float tensor) -> x0_hat.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("origin", "improved", "indi", "direct")

#: K when a caller gives none. ``improved`` gains little past it (docs/method.md: 29.93 dB at
#: K = 10, 29.97 at 20) and every step is one model call; K = T would be T calls per image.
DEFAULT_STEPS = 10


def interpolate(x0: torch.Tensor, xT: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - alpha) * x0 + alpha * xT; a (B,) alpha is applied per example."""
    alpha = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device)
    if alpha.ndim == 1:
        alpha = alpha.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - alpha) * x0 + alpha * xT


def degrade(x0: torch.Tensor, xT: torch.Tensor, t: torch.Tensor | int, *, T: int) -> torch.Tensor:
    """D(x0, xT, t) for integer time t in [0, T] (scalar or (B,))."""
    t = torch.as_tensor(t, device=x0.device)
    return interpolate(x0, xT, t.to(x0.dtype) / T)


def sample_timesteps(
    batch: int,
    T: int,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times, uniform on {1..T} unless ``weights`` (length T, for t = 1..T) say otherwise.

    t = 0 is never drawn: there the input already is the target.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if weights is None:
        t = torch.randint(1, T + 1, (batch,), generator=generator)
    else:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (T,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {T} non-negative numbers with a positive sum")
        t = torch.multinomial(weights, batch, replacement=True, generator=generator) + 1
    return t.to(device) if device is not None else t


def time_weights(T: int, *, at_T: float = 0.0) -> torch.Tensor | None:
    """Weights for ``sample_timesteps``: a share ``at_T`` of the draws at t = T, the rest uniform on 1..T.

    Every sampler's first call, and ``direct``'s only one, is at t = T, where the
    input is the photo itself; uniform times give that point 1/T of the training.
    None (plain uniform) when ``at_T`` is 0.
    """
    if not 0.0 <= at_T <= 1.0:
        raise ValueError(f"at_T must be in [0, 1], got {at_T}")
    if at_T == 0.0:
        return None
    weights = torch.full((T,), (1.0 - at_T) / T, dtype=torch.float64)
    weights[-1] += at_T
    return weights


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "charbonnier", eps: float = 1e-3
) -> torch.Tensor:
    """Mean Charbonnier sqrt((x - y)^2 + eps^2) (a smooth L1), or plain L1 / L2."""
    if kind == "charbonnier":
        return torch.sqrt((pred - target) ** 2 + eps**2).mean()
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown loss kind {kind!r}; choose charbonnier, l1 or l2")


def training_loss(
    model: Denoiser,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    *,
    T: int,
    kind: str = "charbonnier",
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One-sample-per-example estimate of the training objective E_t ||S(D(x0, y, t), t/T) - x0||."""
    t = sample_timesteps(clean.shape[0], T, weights=weights, generator=generator, device=clean.device)
    x_t = degrade(clean, noisy, t, T=T)
    return reconstruction_loss(model(x_t, t.to(clean.dtype) / T), clean, kind=kind)


def check_steps(steps: int, T: int) -> int:
    """``steps`` if it is a K the schedule can take (1..T), else a ValueError naming both."""
    try:
        k = None if isinstance(steps, bool) else operator.index(steps)
    except TypeError:
        k = None
    if k is None or not 1 <= k <= T:
        raise ValueError(f"steps must be an integer in 1..T={T}, got {steps!r}")
    return k


def timestep_schedule(T: int, steps: int) -> list[int]:
    """K + 1 distinct integer times from T down to 0, evenly spread.

    Neighbours are T/K >= 1 apart before rounding, so rounding never merges
    two of them and the schedule always has exactly ``steps`` steps.
    """
    check_steps(steps, T)
    times = torch.linspace(T, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    assert len(set(times)) == steps + 1, times
    return times


@torch.no_grad()
def sample(
    model: Denoiser,
    y: torch.Tensor,
    *,
    T: int,
    steps: int = DEFAULT_STEPS,
    sampler: str = "improved",
) -> torch.Tensor:
    """Denoise the photo y (B, C, H, W) by walking t from T to 0 in ``steps`` steps.

    ``model`` is the UNet or any callable with its signature, e.g. an oracle
    returning the true x0 in tests. ``steps`` must be in 1..T; ``direct`` is a
    single call whatever ``steps`` says. See the module docstring for the
    update rules and the weighted-mean identity of ``improved``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if sampler == "direct":
        steps = 1
    times = timestep_schedule(T, steps)

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), t / T, dtype=x.dtype, device=x.device))

    x = y
    for t, t_next in zip(times[:-1], times[1:]):
        x0_hat = predict(x, t)
        if sampler == "improved":
            x = x - degrade(x0_hat, y, t, T=T) + degrade(x0_hat, y, t_next, T=T)
        elif sampler == "indi":
            x = interpolate(x0_hat, x, t_next / t)
        else:  # origin, and direct as its one-step case
            x = degrade(x0_hat, y, t_next, T=T)
    return x
