"""Session 36: a recipe is compared with the one a state was saved under by what it computes,
not by the repr of what was written: a preset with one of its defaults written out
(``grad_dtype='fp32'`` of fp32 parameters) or an operand spec equal to the preset's but for
a default left unsaid (an MX operand without the explicit floor rule, a block of 32 written out)
was refused a state its preset saved, and the other way round."""

import warnings
from dataclasses import replace

import pytest

from lowbit.errors import UsageError
from lowbit.formats import Granularity
from lowbit.recipes import OperandSpec, Recipe, get_recipe
from lowbit.recipes.recipe import uniform_layer
from tests.precision.one_step import one_step


def _mx(block_size=None) -> OperandSpec:
    return OperandSpec("fp8_e4m3", Granularity.MX, block_size=block_size)  # the rule unsaid


SAME = {
    "grad_dtype written out": replace(get_recipe("bf16-mixed"), grad_dtype="fp32"),
    "mx rule left unsaid": replace(get_recipe("mxfp8"), layer=uniform_layer(_mx())),
    "mx block written out": replace(get_recipe("mxfp8"), layer=uniform_layer(_mx(32))),
}


def _loads_silently(state, recipe) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(recipe).load_state_dict(state)


@pytest.mark.parametrize("same", SAME.values(), ids=list(SAME))
def test_a_preset_written_otherwise_and_the_preset_load_each_others_states(same):
    preset = get_recipe(same.name)
    _loads_silently(one_step(preset).state_dict(), same)
    _loads_silently(one_step(same).state_dict(), preset)


def test_a_state_saved_before_by_the_recipe_as_written_still_loads_into_it():
    """States saved before session 36 recorded each field's repr as written; the recipe written
    so loads them still (and, the fix, the same recipe as its preset writes it does too)."""
    same = SAME["mx block written out"]
    state = one_step(same).state_dict()
    state["preset_changes"] = {"layer": repr(same.layer)}  # as recorded before
    _loads_silently(state, same)
    _loads_silently(one_step(get_recipe("mxfp8")).state_dict(), same)


def test_a_users_recipe_registered_again_with_a_default_written_out_loads_its_state():
    mine = Recipe("mine", "bf16 compute", autocast="bf16")
    _loads_silently(one_step(mine).state_dict(), replace(mine, grad_dtype="fp32"))
    changed = replace(mine, grad_dtype="bf16")  # a default changed, not written out: refused
    with pytest.raises(UsageError, match="differs in grad_dtype"):
        one_step(changed).load_state_dict(one_step(mine).state_dict())
