"""docs/recipes.md's "Your own recipe": its script, run as written, registers two recipes and
trains the first for 2 steps; the command line, which does not run the registration, says where
such a recipe is known."""

import json
import re
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.recipes import presets
from lowbit.train import checkpoint as ckpt
from lowbit.train import trainer as trainer_module

PAGE = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def _script() -> str:
    section = PAGE.read_text().split("## Your own recipe\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


@pytest.fixture
def own_presets(monkeypatch, tmp_path):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # registered ones go after
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)  # short closing samples
    monkeypatch.chdir(tmp_path)


def test_the_documented_script_registers_and_trains_its_recipe(own_presets, tmp_path, capsys):
    exec(compile(_script(), str(PAGE), "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.splitlines()[-1].startswith("completed ")
    run = tmp_path / "runs" / "fp8-e4m3-grads"
    assert json.loads((run / "run.json").read_text())["conversion"].startswith("converted 21/22")
    specs = ckpt.load(ckpt.latest(run))["precision"]["layer_specs"]
    assert specs["model.layers.0.mlp.up_proj"].startswith(
        "fwd fp8_e4m3/tensor x fp8_e4m3/tensor; dgrad fp8_e4m3/tensor x"
    )
    precision = lowbit.Precision("fp8-rows")  # the other one, registered too
    layer = precision.convert(torch.nn.Sequential(torch.nn.Linear(32, 32)))[0]
    assert layer.lowbit_state.spec.forward.describe() == "fp8_e4m3/axis x fp8_e4m3/axis"


def test_the_command_line_says_where_a_recipe_of_ones_own_is_known(own_presets, tmp_path, capsys):
    assert main(["train", "--recipe", "fp8-e4m3-grads", "--out", str(tmp_path / "run")]) != 0
    error = capsys.readouterr().err
    assert "unknown recipe 'fp8-e4m3-grads'" in error
    assert "a recipe of your own (lowbit.recipes.register) is known only to the Python " in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_recipe_of_ones_own_spelt_like_a_preset_is_told_where_it_is_known_too(
    own_presets, tmp_path, capsys
):
    """The docs' own ``fp8-rows`` was answered "did you mean 'fp8-rowwise'?" alone: the hint
    that a registered recipe is known only to its process was given where no preset was alike."""
    assert main(["train", "--recipe", "fp8-rows"]) != 0
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown recipe 'fp8-rows'" in error
    assert "is known only to the Python process that registers it" in error
    assert error.endswith("did you mean 'fp8-rowwise'?") and not list(tmp_path.iterdir())
