"""Spaces around an override's separators (a config file's 'lm_head = keep'): dropped, as no
module name, recipe name or format holds one at either end. An amax history without delayed
scaling: warned about."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import get_recipe
from lowbit.cli import main
from lowbit.recipes import OperandSpec

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


@pytest.mark.parametrize("text", ["0 = keep", " 0=keep ", "0=keep ", "1|0 =keep", "2 | 0=keep"])
def test_an_override_with_spaces_keeps_its_layer(text):
    """' 0=keep' matched no layer (the pattern ' 0'), and '0 = keep' was refused as a misspelt
    'keep' ("did you mean 'keep'?")."""
    report = lowbit.convert(_model(), get_recipe("fp8-tensorwise").with_overrides(text))
    assert "0" in report.kept and "0" not in report.converted
    assert report.unused_overrides == []


def test_an_operand_list_with_spaces_sets_its_operands():
    """'forward.x:bf16, forward.w:bf16' was refused: "' forward.w:bf16' is not OPERAND:FORMAT"."""
    recipe = get_recipe("fp8-tensorwise").with_overrides("0 = forward.x : bf16, forward.w:bf16")
    model = _model()
    lowbit.convert(model, recipe)
    spec = model[0].spec
    assert (spec.forward.a.format, spec.forward.b.format) == ("bf16", "bf16")
    assert spec.grad_input.a.format == "fp8_e5m2"  # the recipe's own, untouched


def test_train_takes_an_override_with_spaces(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *NANO, "--steps", "1", "--quiet", "--out", str(run)]
    assert main([*argv, "--recipe", "fp8-tensorwise", "--override", "lm_head = fp32"]) == 0
    assert "applies to no layer" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec", [{"format": "fp8_e4m3"}, {"format": "int8", "granularity": "axis"}]
)
def test_an_amax_history_without_delayed_scaling_is_warned_about(spec):
    """A history length without scaling='delayed' read as delayed scaling; the operand scaled
    from its current amax without a word (its description shows no history either)."""
    with pytest.warns(UserWarning, match="amax_history=32 is unused.*fix: scaling='delayed'"):
        OperandSpec(**spec, amax_history=32)


def test_a_delayed_amax_history_is_not_warned_about(recwarn):
    OperandSpec("fp8_e4m3", scaling="delayed", amax_history=32)
    OperandSpec("fp8_e4m3")
    assert not [w for w in recwarn if "amax_history" in str(w.message)]
