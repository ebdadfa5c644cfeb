"""Session 40: module names enter override patterns glob-escaped (`names_pattern`), wherever lowbit
writes them: the CNN classifier, the output head, the layers outside the blocks, the first and last
block, the auto plan. ``add_module`` takes any name without a dot; ``fc[0]`` as a glob matches
``fc0`` and not itself, so the layer meant to be kept was converted (and ``fc0`` kept)."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UsageError
from lowbit.recipes import get_recipe
from lowbit.recipes.auto import at_plan, plan_layers


def _named(*layers: tuple[str, nn.Module]) -> nn.Module:
    model = nn.Module()
    for name, layer in layers:
        model.add_module(name, layer)
    return model


def _cnn() -> nn.Module:
    return _named(
        ("stem[0]", nn.Conv2d(3, 8, 3)), ("mid", nn.Conv2d(8, 8, 3)), ("fc[0]", nn.Linear(8, 10))
    )


def test_a_cnn_classifier_named_with_brackets_is_kept():
    report = lowbit.convert(_cnn(), "mxfp8")
    assert sorted(report.converted) == ["mid", "stem[0]"]
    assert report.kept == {"fc[0]": "classification head kept in high precision"}


def test_nvfp4_keeps_a_first_and_last_layer_named_with_brackets():
    report = lowbit.convert(_cnn(), "nvfp4")
    assert list(report.converted) == ["mid"]
    assert set(report.kept) == {"stem[0]", "fc[0]"}


class _WithHead(nn.Module):
    """A model whose output head (``get_output_embeddings()``) is named ``out[0]``, beside a
    layer named ``out0``, which the head's unescaped glob matched instead."""

    def __init__(self):
        super().__init__()
        self.add_module("out0", nn.Linear(8, 8))
        self.add_module("out[0]", nn.Linear(8, 4))

    def get_output_embeddings(self):
        return getattr(self, "out[0]")


def test_an_output_head_named_with_brackets_is_kept_and_its_look_alike_converted():
    report = lowbit.convert(_WithHead(), "fp8-tensorwise")
    assert report.kept == {"out[0]": "output head kept in high precision"}
    assert list(report.converted) == ["out0"]


def _stack_model() -> nn.Module:
    """Three blocks in a stack named ``blocks[a]``, a projection ``proj*`` outside them and a
    layer ``projx`` inside one whose name the unescaped ``*`` also matched."""
    blocks = nn.ModuleList(
        _named(("fc", nn.Linear(8, 8)), ("projx", nn.Linear(8, 8))) for _ in range(3)
    )
    return _named(("proj*", nn.Linear(8, 8)), ("blocks[a]", blocks))


def test_nvfp4_end_blocks_and_outside_layers_named_with_glob_characters():
    report = lowbit.convert(_stack_model(), "nvfp4")
    assert sorted(report.converted) == ["blocks[a].1.fc", "blocks[a].1.projx"]
    assert sorted(report.kept) == [
        "blocks[a].0.fc",
        "blocks[a].0.projx",
        "blocks[a].2.fc",
        "blocks[a].2.projx",
        "proj*",
    ]


def test_an_auto_plan_names_layers_with_glob_characters_literally():
    plan = {"fc[0]": {"forward.x": "fp8"}, "fc*": {"forward.x": "mxfp8"}}
    recipe = at_plan(get_recipe("auto"), plan, 5)
    assert plan_layers(recipe) == ["fc[0]", "fc*"]
    described = {name: recipe.layer_for(name)[0].forward.a.describe() for name in plan}
    assert described == {"fc[0]": "fp8_e4m3/tensor", "fc*": "fp8_e4m3/mx"}
    for other in ("fc0", "fc1"):  # neither layer of the plan
        assert recipe.layer_for(other)[0].forward.a.describe() == "bf16"


def test_a_name_with_the_pattern_separator_is_refused_in_one_line():
    model = _named(("stem", nn.Conv2d(3, 8, 3)), ("fc|0", nn.Linear(8, 10)))
    layer = model.get_submodule("fc|0").weight.clone()
    with pytest.raises(UsageError, match=r"module 'fc\|0' has a '\|' in its name.*fix: name"):
        lowbit.convert(model, "mxfp8")
    assert type(model.get_submodule("stem")) is nn.Conv2d  # nothing swapped
    assert torch.equal(model.get_submodule("fc|0").weight, layer)
