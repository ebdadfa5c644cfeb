"""What `lowbit.convert` and `Precision.convert` are given in place of a model or a recipe
(session 36)."""

import pytest
import torch

import lowbit
from lowbit.errors import UsageError


def test_convert_given_a_precision_names_precision_convert():
    # it listed every preset's name as valid recipes, none of which was the fix
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    precision = lowbit.Precision("fp8-tensorwise")
    with pytest.raises(
        UsageError, match=r"not a Precision; fix: model = precision\.convert\(model\)"
    ):
        lowbit.convert(model, precision)
    assert type(model[0]) is torch.nn.Linear
    assert lowbit.convert(model, precision.recipe).converted == {"0": model[0].spec.describe()}


def test_precision_convert_given_a_list_of_layers_is_refused_in_one_line():
    # it failed with an AttributeError, "'list' object has no attribute 'parameters'"
    layers = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    with pytest.raises(UsageError, match=r"precision\.convert .* got a list; fix: .*Sequential"):
        lowbit.Precision("fp8-tensorwise").convert(layers)
