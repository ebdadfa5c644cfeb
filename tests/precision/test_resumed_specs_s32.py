"""A resumed layer is compared with the spec it was saved with (session 32): several overrides
matching one layer are read operand by operand since then (the first match decided the whole
layer before), so a run with two such overrides, trained before and resumed after, computed in
other formats without a word."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision
from lowbit.recipes import get_recipe

# two overrides that decide operands of every layer (`Recipe.deciding_overrides`)
TWO = ("*=forward.w:bf16", "*=grad_weight.grad_out:bf16")


def trained(overrides):
    """The precision state after two steps of a small MLP under fp8-tensorwise with
    ``overrides``."""
    precision = Precision(get_recipe("fp8-tensorwise").with_overrides(*overrides))
    torch.manual_seed(0)
    model = precision.convert(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    )
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    for _ in range(2):
        with precision.autocast():
            loss = F.cross_entropy(model(torch.randn(8, 32)).float(), torch.randint(0, 10, (8,)))
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
    return precision.state_dict()


def load(state, overrides) -> list[str]:
    """The warnings of loading ``state`` into a fresh model and precision under ``overrides``."""
    precision = Precision(get_recipe("fp8-tensorwise").with_overrides(*overrides))
    model = precision.convert(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    )
    precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision.load_state_dict(state)
    return [str(w.message) for w in caught]


def test_a_layer_resumed_in_other_formats_is_warned_about_once():
    """Saved with both overrides, loaded with the first alone (how the layer computed when the
    first match decided it whole): one warning naming the first layer, both specs and the fix."""
    caught = load(trained(TWO), TWO[:1])
    assert len(caught) == 1, caught
    message = caught[0]
    assert "layer 0 (saved: fwd fp8_e4m3/tensor x bf16;" in message
    assert "now: fwd fp8_e4m3/tensor x bf16;" in message
    assert "and 1 more layer compute in other formats" in message
    assert "operand by operand" in message and "fix: keep the overrides" in message


@pytest.mark.parametrize("overrides", [TWO, TWO[:1], ()])
def test_a_layer_resumed_in_its_own_formats_loads_silently(overrides):
    assert load(trained(overrides), overrides) == []


def test_a_state_saved_before_specs_were_recorded_is_suspect_where_two_overrides_decide():
    """A state from before this change has no specs to compare: a layer that two or more
    overrides decide may have computed otherwise; one that a single override decides did not."""
    legacy = trained(TWO)
    del legacy["layer_specs"]
    caught = load(legacy, TWO)
    assert len(caught) == 1, caught
    assert caught[0].startswith(
        "lowbit: precision.load_state_dict(): layer 0 (saved before lowbit recorded specs; "
        "decided by *=forward.w:bf16 and *=grad_weight.grad_out:bf16) and 1 more layer may "
        "compute in other formats"
    )
    single = trained(TWO[:1])
    del single["layer_specs"]
    assert load(single, TWO[:1]) == []
