"""Follow-ups of session 25's bug hunt in `lowbit.Precision`: a state loaded under another recipe,
and LBFGS stepped without its closure."""

import warnings

import pytest
import torch

import lowbit
from lowbit.errors import UsageError


def _trained_state(recipe: str) -> dict:
    """The state of a `Precision` after two steps of a small model under ``recipe``."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(torch.nn.Linear(8, 8))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for _ in range(2):
        x = torch.randn(4, 8, dtype=precision.compute_dtype)
        precision.backward(model(x).float().square().mean())
        precision.step(optimizer)
        optimizer.zero_grad()
    return precision.state_dict()


def _fresh(recipe: str) -> lowbit.Precision:
    precision = lowbit.Precision(recipe)
    model = precision.convert(torch.nn.Linear(8, 8))
    precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return precision


def test_a_state_of_another_recipe_loads_with_a_warning_naming_both():
    """bf16-low's state loaded into an fp32 Precision dropped its fp32 master weights without a
    word: the run went on from the bf16-rounded weights. Switching recipes can be deliberate, so it
    is a warning, not a refusal."""
    state = _trained_state("bf16-low")
    assert state["update"]["masters"]  # what the fp32 recipe has no place for
    with pytest.warns(UserWarning, match=r"saved under recipe bf16-low, this Precision's is fp32"):
        _fresh("fp32").load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fresh("bf16-low").load_state_dict(state)  # the same recipe: silent


def _lbfgs(recipe: str):
    precision = lowbit.Precision(recipe)
    model = precision.convert(torch.nn.Linear(8, 1))
    optimizer = precision.wrap_optimizer(torch.optim.LBFGS(model.parameters()))
    x = torch.randn(4, 8, dtype=precision.compute_dtype)
    precision.backward(model(x).float().square().mean())
    return precision, optimizer


def test_lbfgs_stepped_without_its_closure_names_the_call_that_takes_one():
    """It failed with PyTorch's "LBFGS.step() missing 1 required positional argument"."""
    precision, optimizer = _lbfgs("fp32")
    with pytest.raises(UsageError, match=r"^LBFGS.step\(\) needs a closure .*fix: precision.step"):
        precision.step(optimizer)
    precision, optimizer = _lbfgs("bf16-low")  # which refuses closures: another optimizer
    with pytest.raises(UsageError, match=r"fix: an optimizer without a closure \(AdamW, SGD\)"):
        precision.step(optimizer)
