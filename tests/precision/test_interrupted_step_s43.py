"""Session 43: a `precision.step` interrupted inside the optimizer's step (Ctrl-C in a notebook,
an out-of-memory error) and called again, as a user retries the cell."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit


def _losses(recipe: str, interrupt: bool) -> list[float]:
    """Four steps of AdamW, clipped; with ``interrupt``, the second step's optimizer step is
    interrupted once (by a step pre-hook) and `precision.step` called again."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    pending = [interrupt]

    def interrupted(opt, args, kwargs):
        if pending[0] and len(losses) == 1:  # the second step's
            pending[0] = False
            raise KeyboardInterrupt

    optimizer.register_step_pre_hook(interrupted)
    for step in range(4):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 32, generator=generator)
        y = torch.randint(0, 8, (8,), generator=generator)
        loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
        precision.backward(loss)
        precision.clip_grad_norm_(optimizer, 0.5)
        try:
            precision.step(optimizer)
        except KeyboardInterrupt:
            precision.step(optimizer)  # the retry
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low", "bf16-pure-kahan", "fp16-mixed"])
def test_a_step_interrupted_in_the_optimizer_and_retried_is_the_step_not_interrupted(recipe):
    """Under 16-bit parameters the interrupted step had taken the fp32 stand-ins out of the
    precision's hands: the retry stepped the 16-bit weights themselves, without master weights,
    unclipped, with 16-bit optimizer states, and the next step failed with PyTorch's "expected
    dtype c10::BFloat16 for `end` but got dtype float"."""
    assert _losses(recipe, interrupt=True) == _losses(recipe, interrupt=False)


def _mlp_run(recipe: str):
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return precision, model, optimizer


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 32, generator=generator), torch.randint(0, 8, (8,), generator=generator)


def _losses_after_update(recipe: str, interrupt: bool) -> list[float]:
    """Four clipped AdamW steps; the second `precision.step` is called twice: with ``interrupt``,
    its first call is interrupted by a step post-hook (after the optimizer's update, a Ctrl-C
    while logging) and the second is the retry; without, both calls run to the end."""
    precision, model, optimizer = _mlp_run(recipe)
    losses, pending = [], [interrupt]

    def interrupted(opt, args, kwargs):
        if pending[0] and len(losses) == 1:
            pending[0] = False
            raise KeyboardInterrupt

    optimizer.register_step_post_hook(interrupted)
    for step in range(4):
        x, y = _batch(step)
        loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
        precision.backward(loss)
        precision.clip_grad_norm_(optimizer, 0.5)
        if step == 1:
            with contextlib.suppress(KeyboardInterrupt):
                precision.step(optimizer)
        precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low", "bf16-pure-kahan", "fp16-mixed"])
def test_a_step_interrupted_after_the_update_and_retried_steps_again_as_a_second_step(recipe):
    """An interruption after the optimizer's update (a step post-hook raising) has stepped: the
    retry is a second `precision.step` with no backward since, as in plain PyTorch. Under 16-bit
    parameters the retry found the step prepared while its fp32 stand-ins were gone, stepped the
    16-bit weights themselves and failed with "expected dtype float for `end` but got dtype
    c10::BFloat16"."""
    assert _losses_after_update(recipe, interrupt=True) == _losses_after_update(
        recipe, interrupt=False
    )


def _gan_losses(recipe: str, interrupt: bool) -> list[float]:
    """Four steps of two models' optimizers stepped in one call, ``precision.step(og, od)``,
    clipped together; with ``interrupt``, the second step's call is interrupted in ``od``'s step
    (``og`` stepped) and called again."""
    precision, generator_model, generator_optimizer = _mlp_run(recipe)
    model = precision.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses, pending = [], [interrupt]

    def interrupted(opt, args, kwargs):
        if pending[0] and len(losses) == 1:
            pending[0] = False
            raise KeyboardInterrupt

    optimizer.register_step_pre_hook(interrupted)
    for step in range(4):
        x, y = _batch(step)
        x = x.to(precision.compute_dtype)
        loss = F.cross_entropy(generator_model(x).float(), y) + F.cross_entropy(model(x).float(), y)
        precision.backward(loss)
        precision.clip_grad_norm_([generator_optimizer, optimizer], 0.5)
        try:
            precision.step(generator_optimizer, optimizer)
        except KeyboardInterrupt:
            precision.step(generator_optimizer, optimizer)  # the retry
        generator_optimizer.zero_grad()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-mixed"])
def test_a_step_of_two_optimizers_retried_steps_only_the_one_not_stepped(recipe):
    """The retry of ``precision.step(og, od)`` interrupted in ``od`` stepped ``og`` a second
    time, from its raw 16-bit gradients (unclipped) under bf16-low."""
    assert _gan_losses(recipe, interrupt=True) == _gan_losses(recipe, interrupt=False)
