"""pipeline.step.train_step is the trainer's step: bit for bit the hand-written sequence, and None skips a part."""

import contextlib
import copy

import pytest
import torch

from pipeline.diffusion import time_weights, training_loss
from pipeline.model import build_model
from pipeline.step import train_step, update_ema
from pipeline.train import lr_factor

T, STEPS, CLIP, DECAY = 20, 4, 0.05, 0.9


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny steps: more threads only wait on each other (seconds a step on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        clean = torch.rand(2, 3, 16, 16, generator=gen)
        out.append((clean, (clean + 0.2 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)))
    return out


def parts(*, scheduler: bool = True) -> dict:
    """A tiny model with its EMA, AdamW, a warmup + cosine schedule and a time generator, seeded."""
    torch.manual_seed(0)
    model = build_model("tiny", width=8, channel_mults=(1, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    return {"model": model, "ema": copy.deepcopy(model).requires_grad_(False), "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, warmup=2, total=STEPS, min_ratio=0.1)) if scheduler else None,
            "generator": torch.Generator().manual_seed(2)}


def hand_written(p: dict, *, clip: float | None, ema: bool, weights, kind: str) -> tuple[list, list]:
    """The sequence pipeline.train's loop wrote out before train_step; returns losses and clipped norms."""
    model, optimizer, losses, norms = p["model"], p["optimizer"], [], []
    for step, (clean, noisy) in enumerate(batches()):
        loss = training_loss(model.train(), clean, noisy, T=T, kind=kind, weights=weights, generator=p["generator"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        if p["scheduler"] is not None:
            p["scheduler"].step()
        if ema:
            update_ema(p["ema"], model, decay=DECAY, step=step)
        losses.append(loss.detach())
    return losses, norms


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_train_step_is_the_hand_written_step_bit_for_bit():
    weights = time_weights(T, at_T=0.3)
    reference = parts()
    ref_losses, norms = hand_written(reference, clip=CLIP, ema=True, weights=weights, kind="l1")
    assert all(n > CLIP for n in norms)  # clipping bites, so skipping or misplacing it would show

    shipped, entered = parts(), []

    @contextlib.contextmanager
    def autocast():
        entered.append(torch.is_grad_enabled())
        yield

    losses = [train_step(model=shipped["model"], optimizer=shipped["optimizer"], clean=clean, noisy=noisy, T=T,
                         kind="l1", weights=weights, generator=shipped["generator"], grad_clip=CLIP,
                         scheduler=shipped["scheduler"], ema=shipped["ema"], ema_decay=DECAY, step=step,
                         autocast=autocast())
              for step, (clean, noisy) in enumerate(batches())]

    assert entered == [True] * STEPS
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(losses, ref_losses))
    assert_same(shipped["model"], reference["model"])
    assert_same(shipped["ema"], reference["ema"])
    assert shipped["optimizer"].param_groups[0]["lr"] == reference["optimizer"].param_groups[0]["lr"]


def test_none_skips_clipping_the_schedule_and_the_ema():
    reference = parts(scheduler=False)
    ref_losses, _ = hand_written(reference, clip=None, ema=False, weights=None, kind="charbonnier")

    shipped = parts(scheduler=False)
    ema_before = copy.deepcopy(shipped["ema"].state_dict())
    losses = [train_step(model=shipped["model"], optimizer=shipped["optimizer"], clean=clean, noisy=noisy, T=T,
                         generator=shipped["generator"])
              for clean, noisy in batches()]

    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert_same(shipped["model"], reference["model"])
    assert shipped["optimizer"].param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(v, shipped["ema"].state_dict()[k]) for k, v in ema_before.items())

    clipped = parts(scheduler=False)  # the same run with clipping ends elsewhere: None really skipped it
    for clean, noisy in batches():
        train_step(model=clipped["model"], optimizer=clipped["optimizer"], clean=clean, noisy=noisy, T=T,
                   generator=clipped["generator"], grad_clip=CLIP)
    assert not torch.equal(clipped["model"].out_conv.weight, shipped["model"].out_conv.weight)


class Wrapper(torch.nn.Module):
    """Stands in for DDP: forwards to the bare model, but has a parameter of its own."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.extra = inner, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return self.inner(x, t)


def test_a_wrapped_model_clips_and_averages_the_bare_one():
    reference, wrapped = parts(), parts()
    wrapper = Wrapper(wrapped["model"])
    for step, (clean, noisy) in enumerate(batches()):
        for p, model, bare in ((reference, reference["model"], None), (wrapped, wrapper, wrapped["model"])):
            train_step(model=model, bare_model=bare, optimizer=p["optimizer"], clean=clean, noisy=noisy, T=T,
                       generator=p["generator"], grad_clip=CLIP, scheduler=p["scheduler"], ema=p["ema"],
                       ema_decay=DECAY, step=step)
    assert_same(wrapped["model"], reference["model"])
    assert_same(wrapped["ema"], reference["ema"])


@pytest.mark.parametrize("missing", ["ema_decay", "step"])
def test_an_ema_update_needs_its_decay_and_step(missing):
    p = parts()
    given = {"ema_decay": DECAY, "step": 0}
    del given[missing]
    clean, noisy = batches(1)[0]
    with pytest.raises(ValueError, match="ema_decay and step"):
        train_step(model=p["model"], optimizer=p["optimizer"], clean=clean, noisy=noisy, T=T, ema=p["ema"], **given)
