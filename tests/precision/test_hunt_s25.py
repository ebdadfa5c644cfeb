"""`Precision` in more loops users write (session 25): deep copies of a run in memory, precision
states of another model or another recipe."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision
from lowbit.errors import UsageError
from tests.precision.test_precision import mlp


def step(precision, model, optimizer, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
    precision.backward(loss)
    precision.step(optimizer)
    optimizer.zero_grad()


def trained(recipe, steps=3, model=None):
    precision = Precision(recipe)
    model = precision.convert(model or mlp())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for seed in range(steps):
        step(precision, model, optimizer, seed)
    return precision, model, optimizer


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low", "bf16-pure-kahan"])
@pytest.mark.parametrize("precision_first", [False, True], ids=["model-first", "precision-first"])
def test_a_deep_copy_of_model_optimizer_and_precision_continues_bit_identically(
    recipe, precision_first
):
    """``copy.deepcopy((model, optimizer, precision))`` (a snapshot of a run in memory) kept the
    master weights and Kahan buffers under the ids of the original parameters: the copy paired
    none of them with its own parameters and started fresh masters from the 16-bit weights."""
    precision, model, optimizer = trained(recipe)
    if precision_first:
        copied_precision, copied_model, copied_optimizer = copy.deepcopy(
            (precision, model, optimizer)
        )
    else:
        copied_model, copied_optimizer, copied_precision = copy.deepcopy(
            (model, optimizer, precision)
        )
    for seed in range(3, 7):
        step(precision, model, optimizer, seed)
        step(copied_precision, copied_model, copied_optimizer, seed)
    assert all(map(torch.equal, model.parameters(), copied_model.parameters()))
    saved, copied = precision.state_dict(), copied_precision.state_dict()
    for part in ("masters", "compensation"):
        assert saved["update"][part].keys() == copied["update"][part].keys()
        assert all(
            torch.equal(saved["update"][part][i], copied["update"][part][i])
            for i in saved["update"][part]
        )


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
def test_a_precision_state_of_another_models_shapes_is_refused_in_one_line(recipe):
    """Master weights (Kahan buffers) of another model loaded silently, and the next step failed
    in tensor arithmetic ("The size of tensor a (64) must match ...")."""
    saved = trained(recipe, steps=1)[0].state_dict()
    narrower = torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )  # fmt: skip
    precision = Precision(recipe)
    model = precision.convert(narrower)
    precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    with pytest.raises(
        UsageError, match=r"parameter 0 has shape \(64, 32\), the parameter \(48, 32\).*fix:"
    ):
        precision.load_state_dict(saved)


@pytest.mark.parametrize(
    ("saved_under", "loaded_under", "kept"),
    [("bf16-low", "bf16-pure-kahan", "compensation"), ("bf16-pure-kahan", "bf16-low", "masters")],
)
def test_a_state_of_another_recipe_keeps_only_what_this_recipe_updates(
    saved_under, loaded_under, kept
):
    """bf16-low's master weights loaded under bf16-pure-kahan (and Kahan buffers under bf16-low)
    were kept though never read: they never moved again and were saved with every later state."""
    saved = trained(saved_under, steps=1)[0].state_dict()
    precision, model, optimizer = trained(loaded_under, steps=0)
    with pytest.warns(UserWarning, match=f"saved under recipe {saved_under}"):
        precision.load_state_dict(saved)
    step(precision, model, optimizer, 1)
    update = precision.state_dict()["update"]
    assert len(update[kept]) == 6
    assert [part for part in ("masters", "compensation") if update[part]] == [kept]
