"""The training recipe's pure parts: time sampling with extra mass at t = T, EMA decay tied to run length."""

import pytest
import torch

from pipeline.config import OptimizerConfig
from pipeline.diffusion import sample_timesteps, time_weights


def test_time_weights_put_the_asked_share_at_T():
    T, share = 50, 0.3
    weights = time_weights(T, at_T=share)
    assert weights.shape == (T,) and float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[-1]) == pytest.approx(share + (1 - share) / T)
    assert torch.allclose(weights[:-1], torch.full((T - 1,), (1 - share) / T, dtype=torch.float64))
    assert time_weights(T, at_T=0.0) is None
    with pytest.raises(ValueError, match="at_T"):
        time_weights(T, at_T=1.5)


def test_drawn_times_follow_the_weights():
    T, share, n = 20, 0.4, 20_000
    t = sample_timesteps(n, T, weights=time_weights(T, at_T=share), generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 1 and int(t.max()) <= T
    expected = share + (1 - share) / T
    assert float((t == T).double().mean()) == pytest.approx(expected, abs=4 * (expected / n) ** 0.5)
    assert torch.equal(sample_timesteps(4, T, weights=time_weights(T, at_T=1.0)), torch.full((4,), T))


def test_ema_half_life_is_a_share_of_the_run():
    opt = OptimizerConfig(ema_half_life=0.1)
    for total in (100, 3000):
        decay = opt.ema_decay_for(total)
        assert decay ** (0.1 * total) == pytest.approx(0.5)
    assert OptimizerConfig(ema_decay=0.99).ema_decay_for(5000) == 0.99
    assert OptimizerConfig(ema_half_life=0.001).ema_decay_for(10) == 0.5  # at least one step
