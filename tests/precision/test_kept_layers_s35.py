"""A precision state loaded under overrides that keep other layers than the state's: a layer
converted on one side and kept on the other was in neither of the spec comparisons (session 32
compared only layers converted both when saved and now), so ``fp8-tensorwise`` saved with
``0=keep`` loaded into the preset, or the other way round, and computed in other formats without
a word, though the docs said such loads are warned of."""

import warnings
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.recipes import get_recipe

FP8 = get_recipe("fp8-tensorwise")
CAUSES = "its overrides differ from the ones it was saved with, or several overrides match"


def mlp(seed=0):
    torch.manual_seed(seed)
    layers = [("body", torch.nn.Linear(32, 32)), ("act", torch.nn.ReLU())]
    return torch.nn.Sequential(OrderedDict([*layers, ("lm_head", torch.nn.Linear(32, 8))]))


def step(precision, models, optimizer):
    loss = sum(model(torch.randn(4, 32)).float().square().mean() for model in models)
    precision.backward(loss)
    precision.step(optimizer)


def trained(recipe, models=1):
    """The state of ``recipe`` after one step of ``models`` small models, each converted."""
    precision = lowbit.Precision(recipe)
    converted = [precision.convert(mlp(seed)) for seed in range(models)]
    params = [p for model in converted for p in model.parameters()]
    step(precision, converted, precision.wrap_optimizer(torch.optim.SGD(params, lr=0.1)))
    return precision.state_dict()


def resumed(recipe, state, steps=2):
    """The warnings of loading ``state`` under ``recipe`` and stepping ``steps`` times."""
    precision = lowbit.Precision(recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = precision.convert(mlp())
        optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        precision.load_state_dict(state)
        for _ in range(steps):
            step(precision, [model], optimizer)
    return [str(w.message) for w in caught]


def test_a_layer_converted_now_that_the_state_kept_is_warned_of_at_the_load():
    precision = lowbit.Precision(FP8)
    precision.convert(mlp())
    with pytest.warns(UserWarning, match=r"layer body \(saved: kept; now: fwd fp8_e4m3") as caught:
        precision.load_state_dict(trained(FP8.with_overrides("body=keep")))
    (message,) = [str(w.message) for w in caught]
    assert "body (saved: kept; now: fwd fp8_e4m3/tensor x fp8_e4m3/tensor;" in message
    assert " computes in other formats" in message and CAUSES in message


@pytest.mark.parametrize("preset", ["fp8-tensorwise", "fp16-mixed"])
def test_a_layer_the_state_converted_that_is_kept_now_is_warned_of_at_the_first_step(preset):
    """Not at the load: a layer of a model not converted yet is not a kept one. fp16-mixed's
    layers kept on a CPU compute in fp32, not in its emulated fp16."""
    recipe = get_recipe(preset)
    caught = resumed(recipe.with_overrides("body=keep"), trained(recipe))
    assert len(caught) == 1, caught
    spec = recipe.layer.describe().split(";")[0]
    assert caught[0].startswith(f"lowbit: precision.load_state_dict(): layer body (saved: {spec}")
    assert "; now: kept) computes in other formats" in caught[0] and CAUSES in caught[0]


def test_the_presets_own_kept_head_converted_without_its_overrides_is_warned_of_both_ways():
    bare = replace(FP8, overrides=())
    assert "lm_head (saved: kept; now: fwd fp8_e4m3" in " ".join(resumed(bare, trained(FP8)))
    assert "lm_head (saved: fwd fp8_e4m3" in " ".join(resumed(FP8, trained(bare)))


@pytest.mark.parametrize("overrides", [(), ("body=keep",), ("lm_head=fp8-tensorwise",)])
def test_a_resume_under_the_same_overrides_is_silent(overrides):
    recipe = FP8.with_overrides(*overrides)
    assert resumed(recipe, trained(recipe)) == []


def test_a_second_model_converted_after_the_load_or_after_the_first_step_is_no_change():
    """A state of two models (a student and its teacher): loaded before either is converted,
    the teacher converted after the first step takes its layers silently; and a state of one
    model takes a second model converted later silently (the saved run had none)."""
    for state in trained(FP8, models=2), trained(FP8):
        precision = lowbit.Precision(FP8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            precision.load_state_dict(state)
            student = precision.convert(mlp())
            optimizer = precision.wrap_optimizer(torch.optim.SGD(student.parameters(), lr=0.1))
            step(precision, [student], optimizer)
            teacher = precision.convert(mlp(1))
            step(precision, [student, teacher], optimizer)
        assert "1:body" in precision.state_dict()["layers"]  # the teacher converted
