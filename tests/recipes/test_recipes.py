import dataclasses

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.recipes import OperandSpec, Recipe, get_recipe, parse_override

PUBLIC_PRESETS = [
    "fp32",
    "fp16-mixed",
    "bf16-mixed",
    "fp16-low",
    "bf16-low",
    "bf16-pure",
    "bf16-pure-sr",
    "bf16-pure-kahan",
    "fp8-tensorwise",
    "fp8-delayed",
    "fp8-rowwise",
    "int8",
]


def test_every_public_preset_exists():
    assert set(PUBLIC_PRESETS) <= set(lowbit.recipe_names())
    for name in PUBLIC_PRESETS:
        assert get_recipe(name).name == name


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(UsageError, match="unknown recipe 'fp9'; valid recipes: fp32, bf16-mixed"):
        get_recipe("fp9")
    # every name train takes
    with pytest.raises(UsageError, match=r"auto, auto:fp6, auto:fp4; fix: "):
        get_recipe("fp9")


def test_recipes_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_recipe("fp32").param_dtype = "bf16"
    with pytest.raises(UsageError, match="16-bit parameters"):
        Recipe("x", "", update_rounding="stochastic")
    with pytest.raises(UsageError, match="delayed scaling needs granularity 'tensor'"):
        OperandSpec("fp8_e4m3", "axis", scaling="delayed")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Recipe("x", "", overrides="lm_head"), "overrides must be a tuple of Override"),
        (lambda: Recipe("x", "", layer="fp8"), "layer must be a LayerSpec"),
        (lambda: Recipe("x", "", loss_scale_growth_interval=2.5), "whole number of steps"),
        (lambda: Recipe("x", "", param_dtype="bf16", master_dtype="bf16"), "master weights are"),
        (lambda: Recipe("x", "", loss_scaling="sometimes"), "valid: none, static, dynamic"),
        (lambda: OperandSpec("fp8_e4m3", "block", block_size=0), "block_size must be a positive"),
        (lambda: OperandSpec("fp8_e4m3", "tiles"), "unknown granularity 'tiles'"),
    ],
)
def test_invalid_recipe_fields_fail_when_the_recipe_is_made(build, message):
    """Not later, inside `convert` or the first forward, with an unrelated error."""
    with pytest.raises(UsageError, match=message):
        build()


def test_fp8_tensorwise_uses_e4m3_forward_and_e5m2_gradients():
    operands = get_recipe("fp8-tensorwise").layer.operands()
    assert operands["forward.x"].format == "fp8_e4m3" and operands["forward.w"].format == "fp8_e4m3"
    assert operands["grad_input.grad_out"].format == "fp8_e5m2"
    assert operands["grad_weight.grad_out"].format == "fp8_e5m2"


def test_overrides_first_match_wins_and_head_is_kept():
    recipe = get_recipe("fp8-tensorwise")
    assert recipe.layer_for("lm_head")[0] is None
    custom = recipe.with_overrides(
        parse_override("model.layers.0.*=keep", recipe),
        parse_override("*.down_proj=grad_weight.grad_out:bf16", recipe),
    )
    assert custom.layer_for("model.layers.0.mlp.up_proj")[0] is None
    spec, reason = custom.layer_for("model.layers.3.mlp.down_proj")
    assert spec.operands()["grad_weight.grad_out"].format == "bf16"
    assert spec.operands()["forward.x"].format == "fp8_e4m3"
    assert "override" in reason
    assert custom.layer_for("model.layers.3.mlp.up_proj")[1] == "recipe default"


def test_heads_are_kept_at_any_depth_and_under_their_transformers_names():
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from lowbit import convert
    from lowbit.models import build_causal_lm

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    small |= {"intermediate_size": 32, "vocab_size": 50}
    models = {
        "inner.lm_head": Wrapper(build_causal_lm("nano", 257, seed=0)),
        "_orig_mod.lm_head": torch.nn.Module(),
        "score": LlamaForSequenceClassification(LlamaConfig(**small, num_labels=3)),
        "cls.predictions.decoder": BertForMaskedLM(BertConfig(**small)),
    }
    models["_orig_mod.lm_head"]._orig_mod = build_causal_lm("nano", 257, seed=0)
    for head, model in models.items():
        report = convert(model, "fp8-tensorwise")
        assert "head kept in high precision" in report.kept[head], head
        assert len(report.converted) >= 4


@pytest.mark.parametrize("bad", ["nothing", "x=", "=keep", "x=forward.q:bf16", "x=forward.x"])
def test_bad_overrides_say_how_to_write_them(bad):
    with pytest.raises(UsageError, match="override"):
        parse_override(bad, get_recipe("fp8-tensorwise"))


def test_recipes_command_prints_one_line_each(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(lowbit.recipe_names())
    assert lines[0].startswith("fp32 ")
    assert main(["recipes", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "fp8_e5m2" in out
    assert "loss scaling dynamic (start 65536, x2 after 2000 clean steps)" in out  # fp16 recipes


def test_recipes_command_shows_the_named_recipes_with_their_operands(capsys):
    assert main(["recipes", "nvfp4", "auto:fp4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert names == ["nvfp4", "auto:fp4"]
    assert "fp4_e2m1/nvfp4" in lines[1] and "cheapest of fp4/fp6/fp8/mxfp8/bf16" in lines[2]
    assert main(["recipes", "nvfp4", "fp9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown recipe 'fp9'" in err and "\n" not in err


def test_docs_recipes_page_holds_the_current_table():
    from pathlib import Path

    from lowbit.recipes.table import recipes_table

    page = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    assert recipes_table() in page, "regenerate with: lowbit recipes --markdown"


def test_bytes_per_param_of_classic_recipes():
    from lowbit.recipes.table import bytes_breakdown

    assert bytes_breakdown(get_recipe("fp32")) == "4+4+0+8 = 16"
    assert bytes_breakdown(get_recipe("fp16-low")) == "2+2+4+8 = 16"  # ZeRO's 16 bytes/param
    assert bytes_breakdown(get_recipe("bf16-pure-kahan")) == "2+2+2+8 = 14"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(format="e8m0"), "e8m0 is a scale format"),
        (dict(format="fp8_e4m3", granularity="nvfp4"), "'nvfp4' needs format fp4_e2m1"),
        (dict(format="int8", granularity="mx"), "'mx' needs a float element format"),
        (dict(format="int8", granularity="axis", block_size=32), "has no blocks"),
    ],
)
def test_an_operand_its_granularity_cannot_quantize_is_refused_when_written(spec, message):
    """They were accepted and failed at the first forward (e8m0 elements: with NaN outputs), or
    were ignored (a block size for per-row scales)."""
    with pytest.raises(UsageError, match=message):
        OperandSpec(**spec)


def test_an_override_giving_nvfp4_blocks_another_format_is_refused_when_parsed():
    with pytest.raises(UsageError, match="'nvfp4' needs format fp4_e2m1"):
        parse_override("*=forward.x:fp8_e4m3", get_recipe("nvfp4"))
