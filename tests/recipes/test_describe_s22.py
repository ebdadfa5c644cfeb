"""A spec's or recipe's description shows everything that makes it compute differently."""

from dataclasses import replace

import torch

import lowbit
from lowbit.cli import main
from lowbit.formats import Granularity
from lowbit.recipes import GemmSpec, OperandSpec, Recipe, get_recipe, uniform_layer


def _without_hadamard(layer):
    return replace(
        layer,
        grad_input=replace(layer.grad_input, transform="none"),
        grad_weight=replace(layer.grad_weight, transform="none"),
    )


def test_a_hadamard_transform_shows_in_the_layer_and_the_conversion_report():
    mxfp4 = get_recipe("mxfp4")
    plain = replace(mxfp4, name="mxfp4-no-rht", layer=_without_hadamard(mxfp4.layer))
    assert mxfp4.layer.describe() != plain.layer.describe()
    assert mxfp4.layer.describe().count("(+hadamard64)") == 2
    assert "hadamard" not in plain.layer.describe()
    assert get_recipe("nvfp4").layer.describe().endswith("fp4_e2m1/nvfp4 (+hadamard16)")

    described = []
    for recipe in (mxfp4, plain):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        report = lowbit.convert(model, recipe)
        assert report.converted["0"] in repr(model[0])  # extra_repr says what the report says
        described.append(report.converted["0"])
    assert described[0] != described[1]


def test_a_block_size_shows_for_every_blocked_granularity():
    def spec(granularity, block_size, fmt="fp8_e4m3"):
        return OperandSpec(fmt, granularity, block_size=block_size).describe()

    assert spec(Granularity.BLOCK, 16) == "fp8_e4m3/block1x16"
    assert spec(Granularity.MX, 16) == "fp8_e4m3/mx(1x16)"
    assert spec(Granularity.MX, 32) == spec(Granularity.MX, None) == "fp8_e4m3/mx"  # the default
    assert spec(Granularity.NVFP4, 32, "fp4_e2m1") == "fp4_e2m1/nvfp4(1x32)"
    assert spec(Granularity.NVFP4, 16, "fp4_e2m1") == "fp4_e2m1/nvfp4"
    # one length for block2d is a square tile, as the quantizer cuts it (it read as 1x16)
    assert spec(Granularity.BLOCK2D, 16) == spec(Granularity.BLOCK2D, (16, 16))
    assert spec(Granularity.BLOCK2D, 16) == "fp8_e4m3/block2d16x16"


def test_a_scale_rule_other_than_the_granularitys_default_shows():
    assert OperandSpec("fp8_e4m3", scale_rule="mx_floor").describe() == "fp8_e4m3/tensor/mx_floor"
    assert OperandSpec("fp8_e4m3", "mx", scale_rule="amax").describe() == "fp8_e4m3/mx/amax"
    assert OperandSpec("fp8_e4m3", "mx", scale_rule="mx_floor").describe() == "fp8_e4m3/mx"


def test_recipes_that_differ_only_in_mx_blocks_describe_apart():
    def mx_recipe(block_size):
        operand = OperandSpec("fp8_e4m3", Granularity.MX, block_size=block_size)
        return Recipe(f"mx{block_size}", "mx blocks", layer=uniform_layer(operand))

    assert mx_recipe(16).layer.describe() != mx_recipe(32).layer.describe()
    assert GemmSpec().describe() == "fp32 x fp32"


def test_the_recipes_listing_shows_the_transform(capsys):
    assert main(["recipes", "mxfp4", "mxfp8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(+hadamard64)" in lines[1]
    # presets without a transform or an unusual block read as they did
    assert lines[3].strip().startswith("fwd fp8_e4m3/mx x fp8_e4m3/mx; dgrad fp8_e4m3/mx x")
