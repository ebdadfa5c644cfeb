"""Session 26 bug hunt: a user's own recipe (specs, names, overrides) and `get_recipe`."""

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.formats import get
from lowbit.recipes import (
    OperandSpec,
    Override,
    Recipe,
    get_recipe,
    register,
    uniform_layer,
)


@pytest.mark.parametrize("granularity", ["block", "block2d"])
def test_a_block_granularity_without_a_block_size_is_refused_when_written(granularity):
    """Accepted, then refused by the first forward's quantization."""
    with pytest.raises(UsageError, match=f"granularity '{granularity}' needs block_size"):
        OperandSpec("fp8_e4m3", granularity)


@pytest.mark.parametrize(
    "options, ignored",
    [
        ({"format": "bf16", "rounding": "stochastic"}, "stochastic rounding"),
        ({"format": "fp32", "rounding": "stochastic"}, "stochastic rounding"),
        ({"format": "fp16", "scaling": "delayed"}, "delayed scaling"),
        ({"format": "bf16", "scale_rule": "pow2"}, "a scale rule"),
    ],
)
def test_a_plain_cast_operand_refuses_what_it_would_ignore(options, ignored):
    """A bf16 operand with stochastic rounding was rounded to nearest without a word (and
    described as plain ``bf16``); delayed scaling kept an amax history nothing read."""
    with pytest.raises(UsageError, match=f"{ignored} would be ignored; fix: drop it"):
        OperandSpec(**options)


def test_a_registered_format_given_as_its_object_is_its_name():
    """``OperandSpec(get("fp8_e4m3"))`` equalled no preset's spec and described as the format's
    repr; ``OperandSpec(get("bf16"))`` was refused as a scaled bf16."""
    e4m3 = OperandSpec(get("fp8_e4m3"), "axis")
    assert e4m3 == OperandSpec("fp8_e4m3", "axis") and e4m3.describe() == "fp8_e4m3/axis"
    assert OperandSpec(get("bf16")) == OperandSpec("bf16")
    assert uniform_layer(OperandSpec(get("fp8_e4m3")), OperandSpec(get("fp8_e5m2"))) == (
        get_recipe("fp8-tensorwise").layer
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"name": 3}, "recipe's name must be of type str"),
        ({"name": " "}, "recipe's name is empty"),
        ({"description": None}, "recipe's description must be of type str"),
    ],
)
def test_a_recipe_name_or_description_that_is_no_text_is_refused(fields, message):
    """``Recipe(3, ...)`` registered, then failed with an AttributeError; an empty name printed a
    blank row in `lowbit recipes`."""
    with pytest.raises(UsageError, match=message):
        replace(get_recipe("fp32"), **fields)


def test_register_refuses_what_is_no_recipe_and_names_a_run_folder_cannot_hold(monkeypatch):
    """``register("fp32")`` failed with an AttributeError; ``my/fp8`` trained into the nested
    folder ``runs/causal-lm-my/fp8-TIME``."""
    from lowbit.recipes import presets

    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))
    with pytest.raises(UsageError, match="register takes a Recipe, got 'fp32'"):
        register("fp32")
    for name, fixed in [("my/fp8", "my-fp8"), ("my fp8", "my-fp8"), ("a\\b", "a-b")]:
        with pytest.raises(UsageError, match=f"without slashes or spaces, e.g. '{fixed}'"):
            register(replace(get_recipe("fp32"), name=name))
    assert "my/fp8" not in presets.names()


def test_master_weights_on_fp32_parameters_are_refused():
    """Ignored by `Precision` (fp32 parameters step in place) while `lowbit recipes` printed
    "fp32 master" and the docs table a master column of fp32."""
    with pytest.raises(UsageError, match="param_dtype is 'fp32'; fix: master_dtype=None"):
        Recipe("mine", "", master_dtype="fp32")


@pytest.mark.parametrize("spelt", ["FP8-Tensorwise", " fp8-tensorwise", "Auto:FP4"])
def test_a_preset_in_another_case_or_with_spaces_is_named(spelt):
    with pytest.raises(UsageError, match=r"did you mean '(fp8-tensorwise|auto:fp4)'"):
        get_recipe(spelt)


@pytest.mark.parametrize(
    "build",
    [
        lambda: OperandSpec(["fp8_e4m3"]),
        lambda: Recipe("mine", "", param_dtype=["bf16"]),
        lambda: Recipe("mine", "", autocast={}),
        lambda: get_recipe(["fp32"]),
    ],
)
def test_a_list_or_dict_where_a_name_belongs_is_refused_in_one_line(build):
    """A config file's list: TypeError (unhashable type) where the name was looked up."""
    with pytest.raises(UsageError, match="unknown"):
        build()


def test_a_handwritten_override_that_matches_no_layer_is_reported():
    """Only `parse_override`'s overrides were reported as applying to no layer: a misspelt
    ``Override("lm_haed")`` written in Python was silently unused."""
    recipe = get_recipe("fp8-tensorwise").with_overrides(
        Override("lm_haed"), Override("1", get_recipe("bf16-mixed").compute_layer)
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    report = lowbit.convert(model, recipe)
    assert report.unused_overrides == ["lm_haed=keep"]
    assert report.converted["1"] == "fwd bf16 x bf16; dgrad bf16 x bf16; wgrad bf16 x bf16"
