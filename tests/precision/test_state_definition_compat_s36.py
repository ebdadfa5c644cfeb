"""Session 36: a precision state records its recipe's definition as a lowbit from before session
36 reads it (``definition`` and ``preset_changes``: the repr of each field as written), and what
it computes under keys of its own (``definition_computed``, ``preset_changes_computed``). The
computed form had replaced the written one, which an older lowbit compared with its recipe's
written form: it refused, as a changed recipe, a state of the very recipe it resumed."""

import warnings
from dataclasses import fields, replace

import pytest

from lowbit.formats import Granularity
from lowbit.recipes import OperandSpec, Recipe, get_recipe
from lowbit.recipes.presets import is_built_in
from lowbit.recipes.recipe import uniform_layer
from tests.precision.one_step import one_step

MX = OperandSpec("fp8_e4m3", Granularity.MX)  # its floor rule and 1x32 block unsaid
RECIPES = {
    "a user's recipe, grad_dtype unsaid": Recipe("mine", "bf16 compute", autocast="bf16"),
    "a user's MX recipe": Recipe("mine-mx", "mx", layer=uniform_layer(MX)),
    "a preset": get_recipe("mxfp8"),
    "a preset's MX operand written otherwise": replace(
        get_recipe("mxfp8"), layer=uniform_layer(replace(MX, block_size=32))
    ),
    "a preset with its grad_dtype written out": replace(
        get_recipe("bf16-mixed"), grad_dtype="fp32"
    ),
    "a changed preset": replace(get_recipe("bf16-mixed"), param_dtype="bf16", autocast=None),
}
# what a state saved under a preset's name leaves out of its changes (as lowbit 35 did)
NOT_PRESET_CHANGES = ("overrides", "initial_loss_scale", "loss_scale_growth_interval")


def _written(recipe) -> dict:
    texts = ("name", "description", "reference")
    return {f.name: repr(getattr(recipe, f.name)) for f in fields(recipe) if f.name not in texts}


def _refused_by_lowbit_35(state: dict, recipe) -> list[str]:
    """The fields in which lowbit 35's `Precision.load_state_dict` found ``recipe`` changed from
    the definition ``state`` recorded (its `_check_definition`, as it was)."""
    now = _written(recipe)
    if not is_built_in(recipe.name):
        saved = state["definition"]
        return [field for field, value in now.items() if saved.get(field, value) != value]
    preset = _written(get_recipe(recipe.name))
    now = {k: v for k, v in now.items() if k not in NOT_PRESET_CHANGES and preset.get(k) != v}
    saved = state["preset_changes"]
    return [f.name for f in fields(recipe) if saved.get(f.name) != now.get(f.name)]


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=list(RECIPES))
def test_a_state_saved_now_loads_into_its_recipe_in_lowbit_35_and_now(recipe):
    state = one_step(recipe).state_dict()
    assert _refused_by_lowbit_35(state, recipe) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(replace(recipe)).load_state_dict(state)
