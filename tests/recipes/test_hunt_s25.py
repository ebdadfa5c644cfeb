"""Session 25 bug hunt: the recipe API (specs, overrides, presets) and `lowbit recipes`."""

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.models import build_causal_lm
from lowbit.recipes import (
    GemmSpec,
    LayerSpec,
    OperandSpec,
    Override,
    Recipe,
    get_recipe,
    parse_override,
    uniform_layer,
)


def _train_step(recipe: Recipe) -> dict[str, torch.Tensor]:
    """One step of a small model in ``recipe``: its parameters afterwards."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    with precision.autocast():
        loss = model(torch.randn(16, 64)).float().square().mean()
    precision.backward(loss)
    precision.step(optimizer)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_block_size_given_as_a_list_trains_as_the_tuple():
    """A list (as a config file or JSON gives it) made the spec unhashable: TypeError at convert."""
    as_list = OperandSpec("fp8_e4m3", "block2d", block_size=[32, 32])
    as_tuple = OperandSpec("fp8_e4m3", "block2d", block_size=(32, 32))
    assert as_list == as_tuple and hash(as_list) == hash(as_tuple)
    recipe = Recipe("blocks", "2-D blocks", layer=uniform_layer(as_list), autocast="bf16")
    expected = _train_step(replace(recipe, layer=uniform_layer(as_tuple)))
    for name, value in _train_step(recipe).items():
        assert torch.equal(value, expected[name]), name


def test_an_override_with_a_list_of_operands_is_hashable_as_the_recipe():
    layer = get_recipe("fp8-tensorwise").layer
    override = Override("lm_head", layer, "mine", operands=["forward.x"])
    assert override == Override("lm_head", layer, "mine", operands=("forward.x",))
    hash(get_recipe("fp8-tensorwise").with_overrides(override))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: GemmSpec(a="fp8_e4m3"), "GEMM operand must be of type OperandSpec"),
        (lambda: uniform_layer("fp8_e4m3"), "GEMM operand must be of type OperandSpec"),
        (
            lambda: LayerSpec(forward=OperandSpec("fp8_e4m3")),
            "layer's GEMM must be of type GemmSpec",
        ),
        (lambda: Override("lm_head", "keep"), "override's layer must be of type LayerSpec"),
        (lambda: Override("lm_head", operands=("forward.q",)), "unknown override operands"),
        (lambda: Override(None), "module-name glob"),
    ],
)
def test_a_spec_of_the_wrong_type_is_refused_when_written(build, message):
    """These failed at the first conversion with an AttributeError deep in lowbit.nn."""
    with pytest.raises(UsageError, match=message):
        build()


@pytest.mark.parametrize("budget", ["auto", "auto:fp4"])
def test_auto_as_an_override_is_refused_with_the_fix(budget):
    """``PATTERN=auto`` gave the layers auto's bf16 start, fixed: the controller never moved them
    (under ``--recipe auto`` too); ``auto:fp4`` was refused as a malformed OPERAND:FORMAT."""
    with pytest.raises(UsageError, match=f"whole run.*fix: --recipe {budget}"):
        parse_override(f"model.layers.0.*={budget}", get_recipe("auto"))


def test_an_operand_named_twice_in_an_override_is_refused():
    """The last one silently won (``forward.x:bf16,forward.x:fp8_e5m2``: a typo for forward.w)."""
    with pytest.raises(UsageError, match=r"names forward\.x more than once"):
        parse_override("lm_head=forward.x:bf16,forward.x:fp8_e5m2", get_recipe("fp8-tensorwise"))


@pytest.mark.parametrize("scale", ["65536", True, None])
def test_a_loss_scale_that_is_not_a_number_is_refused_in_one_line(scale):
    with pytest.raises(UsageError, match="loss scale must be a positive fp32 number"):
        replace(get_recipe("fp16-mixed"), initial_loss_scale=scale)


def test_an_fp32_autocast_is_refused_rather_than_turned_off_by_torch():
    with pytest.raises(UsageError, match="autocast=None for fp32"):
        replace(get_recipe("bf16-mixed"), autocast="fp32")


def test_recipes_markdown_prints_the_rows_of_the_named_recipes(capsys):
    """``lowbit recipes --markdown nvfp4`` printed all 20 presets' rows, the name ignored."""
    assert main(["recipes", "--markdown", "nvfp4", "auto:fp4"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| `nvfp4`", "| `auto:fp4`"]
    assert rows[0].startswith("| recipe |") and len(rows) == 4


class _TinyLM(torch.nn.Module):
    """Four blocks of two linear layers and an ``lm_head``, the layout the presets keep."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)) for _ in range(4)
        )
        self.lm_head = torch.nn.Linear(32, 16)


def _converted(recipe_name: str, override: str):
    recipe = get_recipe(recipe_name)
    model = _TinyLM()
    report = lowbit.convert(model, recipe.with_overrides(parse_override(override, recipe)))
    return model, report


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "nvfp4", "auto"])
def test_an_operand_override_raising_precision_leaves_the_kept_layers_kept(recipe):
    """``*=grad_weight.grad_out:bf16`` converted the output head (and nvfp4's end blocks) that
    the recipe keeps, with the recipe's fp8/fp4 operands for the other five."""
    model, report = _converted(recipe, "*=grad_weight.grad_out:bf16")
    assert report.kept["lm_head"] == "output head kept in high precision"
    assert type(model.lm_head) is torch.nn.Linear
    kept_blocks = {"layers.0.0", "layers.3.1"} if recipe == "nvfp4" else set()
    assert kept_blocks <= set(report.kept)
    converted = lowbit.nn.lowbit_layers(model)["layers.1.0"].spec
    assert converted == get_recipe(recipe).layer.with_operands(
        {"grad_weight.grad_out": OperandSpec("bf16")}
    )


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "auto"])
def test_an_operand_override_of_a_kept_layer_changes_only_that_operand(recipe):
    """``lm_head=forward.x:fp8_e4m3``: the head's other operands stay in the compute dtype (bf16
    under autocast), not the recipe's fp8, and `auto`'s controller leaves all six alone."""
    model, _ = _converted(recipe, "lm_head=forward.x:fp8_e4m3")
    head = lowbit.nn.lowbit_layers(model)["lm_head"]
    formats = {operand: spec.format for operand, spec in head.spec.operands().items()}
    assert formats == {**dict.fromkeys(formats, "bf16"), "forward.x": "fp8_e4m3"}
    assert head.lowbit_state.fixed_operands == set(formats)


def test_an_override_that_changes_nothing_on_a_kept_layer_is_not_called_unused():
    """lm_head is kept in bf16 by fp8-tensorwise, so 'lm_head=grad_weight.grad_out:bf16' changes
    none of its operands: it decides the layer (kept), and "applies to no layer" would send the
    user looking for a misspelt name. A misspelt one is still reported."""
    recipe = get_recipe("fp8-tensorwise")
    recipe = recipe.with_overrides(
        parse_override("lm_head=grad_weight.grad_out:bf16", recipe),
        parse_override("lm_haed=keep", recipe),
    )
    report = lowbit.convert(build_causal_lm("nano", 257), recipe)
    assert report.unused_overrides == ["lm_haed=keep"]
    assert "lm_head" in report.kept


def test_a_users_recipe_cannot_replace_a_built_in_preset(monkeypatch):
    """lowbit.recipes.register replaced a built-in preset (every later run of 'fp32' computed
    the user's recipe) and took 'auto:' names get_recipe can never return."""
    from dataclasses import replace as changed

    from lowbit.recipes import presets, register

    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # the user's go after
    fp32 = get_recipe("fp32")
    assert register(fp32) is fp32  # the same recipe again: nothing changes
    with pytest.raises(UsageError, match=r"'fp32' is a built-in preset; fix: .*fp32-custom"):
        register(changed(fp32, description="mine"))
    assert get_recipe("fp32") == fp32
    with pytest.raises(UsageError, match="auto"):
        register(changed(fp32, name="auto:mine"))
    mine = register(changed(fp32, name="fp32-mine"))
    assert get_recipe("fp32-mine") is mine
    assert register(changed(mine, description="again")).description == "again"  # yours: replaced
