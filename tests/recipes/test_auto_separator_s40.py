"""``auto`` refuses a model with ``|`` in a layer's name when it converts, in `names_pattern`'s one
line, as nvfp4 does: accepted, its plan (`at_plan`) failed later, in the trainer's memory report
or ``lowbit estimate``."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UsageError


@pytest.mark.parametrize("recipe", ["auto", "auto:fp4"])
def test_auto_refuses_a_layer_named_with_the_pattern_separator(recipe):
    model = nn.Sequential()
    model.add_module("a|b", nn.Linear(8, 8))
    model.add_module("head", nn.Linear(8, 4))
    weight = model.get_submodule("a|b").weight.clone()
    with pytest.raises(UsageError, match=r"module 'a\|b' has a '\|' in its name.*fix: name") as e:
        lowbit.convert(model, recipe)
    assert "\n" not in str(e.value)
    assert type(model.get_submodule("a|b")) is nn.Linear  # nothing swapped
    assert torch.equal(model.get_submodule("a|b").weight, weight)
