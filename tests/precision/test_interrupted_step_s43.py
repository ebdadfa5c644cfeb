"""Session 43: a `precision.step` interrupted inside the optimizer's step (Ctrl-C in a notebook,
an out-of-memory error) and called again, as a user retries the cell."""

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
