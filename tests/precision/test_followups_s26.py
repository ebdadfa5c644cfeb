"""A user's registered recipe, registered again with other numerics before a run resumes."""

from dataclasses import replace

import pytest

from lowbit.errors import UsageError
from lowbit.recipes import get_recipe, presets, register
from lowbit.train import TrainConfig, train
from tests.precision.one_step import one_step


@pytest.fixture
def own_presets(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # registered ones go after


def test_a_state_of_a_recipe_defined_otherwise_under_its_name_is_refused(own_presets):
    """The name alone was recorded: a state saved under 'mine' as fp8-tensorwise loaded into a
    'mine' registered as mxfp8 without a word, and the run went on in other numerics."""
    mine = register(replace(get_recipe("fp8-tensorwise"), name="mine"))
    state = one_step(mine).state_dict()
    assert one_step(get_recipe("mine")).load_state_dict(state) is None  # as it was: loads
    register(replace(get_recipe("mxfp8"), name="mine", description="another text"))
    with pytest.raises(UsageError, match=r"recipe 'mine' .* differs in layer; fix: register"):
        one_step(get_recipe("mine")).load_state_dict(state)


def test_a_changed_text_alone_loads(own_presets):
    mine = register(replace(get_recipe("fp8-tensorwise"), name="mine"))
    state = one_step(mine).state_dict()
    register(replace(mine, description="renamed in the docs", reference="a paper"))
    one_step(get_recipe("mine")).load_state_dict(state)


def test_a_run_resumed_under_a_recipe_registered_again_otherwise_is_refused(own_presets, tmp_path):
    register(replace(get_recipe("fp8-tensorwise"), name="mine"))
    settings = {"model": "nano", "seq_len": 16, "batch_size": 4, "eval_batches": 1}
    config = TrainConfig(**settings, recipe="mine", steps=2, out=str(tmp_path / "run"))
    train(config, quiet=True)
    register(replace(get_recipe("mxfp8"), name="mine"))
    longer = replace(config, steps=3)
    with pytest.raises(UsageError, match=r"recipe 'mine' .* differs in layer"):
        train(longer, resume=True, quiet=True)
