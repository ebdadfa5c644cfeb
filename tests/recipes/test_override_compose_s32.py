"""Session 32: ``OPERAND:FORMAT`` overrides of one layer compose, first match winning per operand.

The first matching override decided the whole layer: a `lowbit doctor` suggestion added after the
user's own operand override was dropped (and suggested again), and put first it dropped the
user's operand instead.
"""

import json

import pytest
import torch

import lowbit
from lowbit import get_recipe
from lowbit.cli import main
from lowbit.train.config import read, recipe_of

USER = "model.layers.*=forward.w:bf16"
SUGGESTED = "model.layers.0.self_attn.q_proj=grad_input.grad_out:bf16,grad_weight.grad_out:bf16"
Q = "model.layers.0.self_attn.q_proj"
NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


def _formats(layer) -> dict[str, str]:
    return {operand: spec.format for operand, spec in layer.operands().items()}


def test_operand_overrides_of_one_layer_compose_in_either_order():
    recipe = get_recipe("fp16-mixed")
    wanted = {
        "forward.x": "fp16",
        "forward.w": "bf16",
        "grad_input.grad_out": "bf16",
        "grad_input.w": "fp16",
        "grad_weight.grad_out": "bf16",
        "grad_weight.x": "fp16",
    }
    for order in ((USER, SUGGESTED), (SUGGESTED, USER)):
        composed = recipe.with_overrides(*order)
        layer, reason = composed.layer_for(Q)
        assert _formats(layer) == wanted, order
        assert USER in reason and SUGGESTED in reason, reason
        assert composed.fixed_operands(Q) == {
            "forward.w",
            "grad_input.grad_out",
            "grad_weight.grad_out",
        }
        assert composed.deciding_overrides(Q) == composed.overrides[:2]
        # the other layers take the user's override alone
        assert _formats(composed.layer_for("model.layers.1.self_attn.q_proj")[0])["forward.w"] == (
            "bf16"
        )


def test_the_earlier_override_wins_an_operand_both_name():
    recipe = get_recipe("fp8-tensorwise")
    composed = recipe.with_overrides("a=forward.w:bf16", "*=forward.w:fp16,forward.x:bf16")
    formats = _formats(composed.layer_for("a")[0])
    assert formats["forward.w"] == "bf16" and formats["forward.x"] == "bf16"
    # an operand override after another one naming only its operands decides nothing
    shadowed = recipe.with_overrides("a=forward.w:bf16", "a=forward.w:fp16")
    assert shadowed.deciding_overrides("a") == shadowed.overrides[:1]


def test_a_whole_layer_override_first_decides_the_layer_and_after_is_the_base():
    recipe = get_recipe("fp8-tensorwise")
    first = recipe.with_overrides("a=fp32", "a=forward.w:bf16")
    assert first.layer_for("a")[0] == get_recipe("fp32").compute_layer
    assert first.deciding_overrides("a") == first.overrides[:1]
    after = recipe.with_overrides("a=forward.w:bf16", "a=fp32")
    formats = _formats(after.layer_for("a")[0])
    assert formats.pop("forward.w") == "bf16" and set(formats.values()) == {"fp32"}
    # kept: autocast's bf16 operands, with the named one changed
    kept = _formats(recipe.with_overrides("a=forward.w:fp32", "a=keep").layer_for("a")[0])
    assert kept.pop("forward.w") == "fp32" and set(kept.values()) == {"bf16"}


def test_operand_overrides_of_a_kept_layer_compose_on_its_compute_dtype():
    recipe = get_recipe("fp8-tensorwise")  # keeps lm_head in bf16
    composed = recipe.with_overrides("lm_head=forward.w:fp32", "lm_head=grad_weight.x:fp16")
    formats = _formats(composed.layer_for("lm_head")[0])
    assert formats.pop("forward.w") == "fp32" and formats.pop("grad_weight.x") == "fp16"
    assert set(formats.values()) == {"bf16"}


def test_composed_overrides_convert_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    recipe = get_recipe("fp8-tensorwise").with_overrides(
        "0=forward.w:bf16", "0=grad_weight.grad_out:bf16"
    )
    report = lowbit.convert(model, recipe)
    assert report.converted["0"] == (
        "fwd fp8_e4m3/tensor x bf16; dgrad fp8_e5m2/tensor x fp8_e4m3/tensor; "
        "wgrad bf16 x fp8_e4m3/tensor"
    )
    assert model[0].lowbit_state.fixed_operands == {"forward.w", "grad_weight.grad_out"}


def test_doctor_probes_the_user_override_and_its_suggestion_together(tmp_path):
    """The repro: the suggestion, added after the user's override as doctor prints it, left its
    operands fp16 (and doctor suggested it again); the run's config.yaml keeps both, in order, and
    gives the same recipe back."""
    out = tmp_path / "doctor"
    argv = ["doctor", *NANO, "--recipe", "fp16-mixed", "--probe-steps", "1", "--out", str(out)]
    assert main([*argv, "--override", USER, "--override", SUGGESTED]) == 0
    rows = json.loads((out / "doctor.json").read_text(encoding="utf-8"))["rows"]
    specs = {r["operand"]: r["spec"] for r in rows if r["layer"] == Q}
    assert specs["forward.w"] == "bf16"
    assert specs["grad_input.grad_out"] == specs["grad_weight.grad_out"] == "bf16"
    assert specs["forward.x"] == specs["grad_input.w"] == specs["grad_weight.x"] == "fp16"


def test_train_config_keeps_composed_overrides(tmp_path):
    run = tmp_path / "run"
    argv = [
        "train",
        *NANO,
        "--recipe",
        "fp16-mixed",
        "--steps",
        "1",
        "--eval-batches",
        "1",
        "--quiet",
    ]
    assert main([*argv, "--out", str(run), "--override", USER, "--override", SUGGESTED]) == 0
    config = read(run)
    assert config.overrides == [USER, SUGGESTED]
    recipe = recipe_of(config)
    assert recipe == get_recipe("fp16-mixed").with_overrides(USER, SUGGESTED)
    assert _formats(recipe.layer_for(Q)[0])["grad_weight.grad_out"] == "bf16"


@pytest.mark.parametrize(
    ("spelt", "preset"),
    [
        ("fp8_tensorwise", "fp8-tensorwise"),
        ("MXFP8_RCEIL", "mxfp8-rceil"),
        ("bf16mixed", "bf16-mixed"),
        ("fp8-rowise", "fp8-rowwise"),
        ("auto_fp4", "auto:fp4"),
    ],
)
def test_a_preset_with_underscores_or_a_typo_is_named(spelt, preset, capsys):
    """Only another case or spaces were named: 'fp8_tensorwise' (written as the format names are)
    was refused with the list of 22 names and no hint."""
    assert main(["recipes", spelt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"fix: did you mean {preset!r}?"), err


@pytest.mark.parametrize(
    ("what", "meant"), [("fp8_tensorwise", "fp8-tensorwise"), ("Keep", "keep")]
)
def test_a_misspelt_override_preset_or_keep_is_named(tmp_path, capsys, what, meant):
    """Read as a malformed OPERAND:FORMAT list: "'fp8_tensorwise' is not OPERAND:FORMAT with
    OPERAND one of ...", no word of the preset it misspelt."""
    run = tmp_path / "run"
    argv = ["train", *NANO, "--steps", "1", "--quiet", "--out", str(run)]
    assert main([*argv, "--override", f"lm_head={what}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"fix: did you mean {meant!r}?"), err
    assert not run.exists()


def test_an_override_composed_with_another_is_not_reported_unused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    recipe = get_recipe("fp8-tensorwise").with_overrides(
        "0=forward.w:bf16", "0=grad_weight.grad_out:bf16", "0=forward.w:fp16"
    )
    # the third names only an operand the first decides: shadowed, so reported
    assert lowbit.convert(model, recipe).unused_overrides == ["0=forward.w:fp16"]
