"""Session 30 bug hunt: recipes built by hand, per-module overrides and `lowbit.convert`."""

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.recipes import OperandSpec, get_recipe, parse_override, uniform_layer


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 8)
        self.down = torch.nn.Linear(8, 8)


class _Llama(torch.nn.Module):
    """Llama's names: ``model.layers.<i>.*`` and ``lm_head``."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_Block() for _ in range(3))
        self.lm_head = torch.nn.Linear(8, 8)


def _kept(override: str) -> set[str]:
    base = get_recipe("fp8-tensorwise")
    report = lowbit.convert(_Llama(), base.with_overrides(parse_override(override, base)))
    return {name for name, reason in report.kept.items() if reason == f"override {override}"}


@pytest.mark.parametrize(
    "override, kept",
    [
        # resolved as one glob, the '|' was matched literally: the last block was converted
        (
            "lm_head|model.layers.{last}.*=keep",
            {"lm_head", "model.layers.2.up", "model.layers.2.down"},
        ),
        (
            "model.layers.0.*|model.layers.{last}.*=keep",
            {f"model.layers.{i}.{p}" for i in (0, 2) for p in ("up", "down")},
        ),
        # two {last} alternatives: the whole override matched nothing
        (
            "model.layers.{last}.up|model.layers.{last}.down=keep",
            {f"model.layers.2.{p}" for p in ("up", "down")},
        ),
        # a placeholder alternative beside a glob: the first block was converted
        ("{first block}|lm_head=keep", {"lm_head", "model.layers.0.up", "model.layers.0.down"}),
        ("{last block}|lm_head=keep", {"lm_head", "model.layers.2.up", "model.layers.2.down"}),
    ],
)
def test_each_alternative_of_an_override_resolves_its_placeholders(override, kept):
    assert _kept(override) == kept


def test_a_second_last_inside_the_first_is_the_highest_index_there():
    """``{last}`` twice in one glob: only the first was resolved, so the override matched no
    layer. Block 2 holds experts 0-1, block 0 experts 0-3: block 2's last expert is 1."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for experts in (4, 1, 2):
        block = torch.nn.Module()
        block.experts = torch.nn.ModuleList(_Block() for _ in range(experts))
        model.layers.append(block)
    base = get_recipe("fp8-tensorwise")
    override = "layers.{last}.experts.{last}.up=keep"
    report = lowbit.convert(model, base.with_overrides(parse_override(override, base)))
    assert [name for name, reason in report.kept.items() if override in reason] == [
        "layers.2.experts.1.up"
    ]
    assert report.unused_overrides == []


_FP8 = uniform_layer(OperandSpec("fp8_e4m3"), OperandSpec("fp8_e5m2"))


@pytest.mark.parametrize(
    "preset, changes",
    [
        # a CPU turned bf16 autocast off and computed in fp32
        ("bf16-mixed", {"emulate_fp16_gemms_on_cpu": True}),
        # fp8 GEMMs with fp16 elsewhere: a CPU ran them without autocast, a GPU dropped them
        ("fp16-mixed", {"layer": _FP8}),
        ("fp16-low", {"layer": _FP8}),
        ("fp16-mixed", {"emulate_fp16_gemms_on_cpu": "no"}),  # a true string
    ],
)
def test_fp16_emulation_is_refused_where_it_is_not_fp16_compute(preset, changes):
    with pytest.raises(UsageError, match="emulate_fp16_gemms_on_cpu"):
        replace(get_recipe(preset), name="mine", **changes)


def test_fp8_gemms_with_fp16_elsewhere_need_no_emulation():
    recipe = replace(
        get_recipe("fp16-mixed"), name="mine", layer=_FP8, emulate_fp16_gemms_on_cpu=False
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    assert len(lowbit.convert(model, recipe).converted) == 2


@pytest.mark.parametrize(
    "override, hint",
    [
        (
            "model.layers.1=keep",
            "(model.layers.1 (_Block) is no GEMM layer: model.layers.1.* names",
        ),
        ("model.norm=fp32", "(model.norm (LayerNorm) computes no GEMM: not converted anyway)"),
        ("lm_haed=keep", "(lowbit doctor lists the names)"),  # a misspelt name
    ],
)
def test_an_override_of_a_module_that_is_no_gemm_layer_says_what_it_names(override, hint):
    """``model.layers.1=keep`` (a block, not the layers inside) read as a misspelt name."""
    model = _Llama()
    model.model.norm = torch.nn.LayerNorm(8)
    base = get_recipe("fp8-tensorwise")
    report = lowbit.convert(model, base.with_overrides(parse_override(override, base)))
    assert report.unused_overrides == [override]
    assert f"override {override} applies to no layer {hint}" in report.summary()


def test_with_overrides_takes_the_text_of_an_override():
    """``with_overrides('lm_head=keep')``, as ``--override`` takes it, was refused with the
    recipe's whole tuple of overrides (800 characters)."""
    base = get_recipe("fp8-tensorwise")
    recipe = base.with_overrides("model.layers.0.*=keep", parse_override("lm_head=fp32", base))
    report = lowbit.convert(_Llama(), recipe)
    assert report.kept["model.layers.0.up"] == "override model.layers.0.*=keep"
    assert report.converted["lm_head"] == "fwd fp32 x fp32; dgrad fp32 x fp32; wgrad fp32 x fp32"


def test_an_override_of_another_type_is_refused_naming_it_alone():
    with pytest.raises(UsageError) as refused:
        replace(get_recipe("fp8-tensorwise"), overrides=("lm_head=keep",))
    message = str(refused.value)
    assert message.startswith("an override must be an Override, got 'lm_head=keep'; fix: e.g. ")
    assert "recipe.with_overrides('lm_head=keep')" in message and len(message) < 200
