"""The ``indi`` sampler: its update rule, its identities, and what it does with the noise of x_t."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.diffusion import degrade, sample, timestep_schedule


def oracle(x0: torch.Tensor):
    return lambda x, t: x0.expand_as(x)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 200), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_a_perfect_denoiser_gives_x0(T, k, seed):
    k = min(k, T)
    gen = torch.Generator().manual_seed(seed)
    x0, y = torch.rand(2, 3, 5, 4, generator=gen), torch.rand(2, 3, 5, 4, generator=gen)
    assert torch.allclose(sample(oracle(x0), y, T=T, steps=k, sampler="indi"), x0, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 100), seed=st.integers(0, 10_000))
def test_one_step_is_direct(T, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.rand(1, 3, 6, 6, generator=gen)
    model = lambda x, t: 0.5 * x + 0.1 * t.view(-1, 1, 1, 1)  # noqa: E731 - any deterministic map
    assert torch.equal(sample(model, y, T=T, steps=1, sampler="indi"), sample(model, y, T=T, sampler="direct"))


def test_each_step_lands_on_the_line_through_x0_hat_and_the_reestimated_endpoint():
    """x_{t'} = D(x0_hat, y_hat, t') with y_hat = (x_t - (1 - t/T) x0_hat) / (t/T)."""
    T, k = 50, 4
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 8, 8, generator=gen)
    calls = []
    predict = lambda x: (0.8 * x + 0.1).clamp(0, 1)  # noqa: E731 - an imperfect denoiser

    def model(x, t):
        calls.append((x.clone(), int(round(float(t[0]) * T))))
        return predict(x)

    out = sample(model, y, T=T, steps=k, sampler="indi")
    times = timestep_schedule(T, k)
    inputs = [x for x, _ in calls] + [out]
    assert [t for _, t in calls] == times[:-1]
    for (x_t, t), t_next, x_next in zip(calls, times[1:], inputs[1:]):
        x0_hat = predict(x_t)
        y_hat = (x_t - (1 - t / T) * x0_hat) / (t / T)
        assert torch.allclose(x_next, degrade(x0_hat, y_hat, t_next, T=T), atol=1e-5)


def test_noise_share_of_x_t_follows_the_schedule():
    """With x0_hat = x0 + e (a fixed error), x_t keeps exactly t/T of the photo's noise, like origin."""
    T, k = 100, 5
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, 8, 8, generator=gen)
    noise = 0.1 * torch.randn(1, 3, 8, 8, generator=gen)
    seen = []

    def model(x, t):
        seen.append((x.clone(), float(t[0])))
        return x0

    sample(model, x0 + noise, T=T, steps=k, sampler="indi")
    for x, a in seen:
        assert torch.allclose(x - x0, a * noise, atol=1e-6)


def test_rejects_unknown_samplers():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, torch.zeros(1, 3, 4, 4), T=10, steps=2, sampler="InDI")
