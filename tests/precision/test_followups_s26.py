"""A user's registered recipe, registered again with other numerics before a run resumes."""

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.recipes import get_recipe, presets, register
from lowbit.train import TrainConfig, train


@pytest.fixture
def own_presets(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # registered ones go after


def _step(recipe):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with precision.autocast():
        loss = model(torch.randn(4, 32)).square().mean()
    precision.backward(loss)
    precision.step(optimizer)
    return precision


def test_a_state_of_a_recipe_defined_otherwise_under_its_name_is_refused(own_presets):
    """The name alone was recorded: a state saved under 'mine' as fp8-tensorwise loaded into a
    'mine' registered as mxfp8 without a word, and the run went on in other numerics."""
    mine = register(replace(get_recipe("fp8-tensorwise"), name="mine"))
    state = _step(mine).state_dict()
    assert _step(get_recipe("mine")).load_state_dict(state) is None  # as it was: loads
    register(replace(get_recipe("mxfp8"), name="mine", description="another text"))
    with pytest.raises(UsageError, match=r"recipe 'mine' .* differs in layer; fix: register"):
        _step(get_recipe("mine")).load_state_dict(state)


def test_a_changed_text_alone_loads(own_presets):
    mine = register(replace(get_recipe("fp8-tensorwise"), name="mine"))
    state = _step(mine).state_dict()
    register(replace(mine, description="renamed in the docs", reference="a paper"))
    _step(get_recipe("mine")).load_state_dict(state)


def test_a_run_resumed_under_a_recipe_registered_again_otherwise_is_refused(own_presets, tmp_path):
    register(replace(get_recipe("fp8-tensorwise"), name="mine"))
    settings = {"model": "nano", "seq_len": 16, "batch_size": 4, "eval_batches": 1}
    config = TrainConfig(**settings, recipe="mine", steps=2, out=str(tmp_path / "run"))
    train(config, quiet=True)
    register(replace(get_recipe("mxfp8"), name="mine"))
    longer = replace(config, steps=3)
    with pytest.raises(UsageError, match=r"recipe 'mine' .* differs in layer"):
        train(longer, resume=True, quiet=True)
