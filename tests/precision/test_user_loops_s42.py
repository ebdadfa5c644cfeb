"""Session 42: a user's own training loops with lowbit as a library (README "As a library")."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import UsageError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)
    )


def _steps(precision, model, optimizer, steps, direct=False) -> list[float]:
    """The losses of the loop's ``steps`` (batch i drawn from seed i); ``direct``: the wrapped
    optimizer's own ``optimizer.step()`` in place of ``precision.step(optimizer)``."""
    losses = []
    for i in steps:
        generator = torch.Generator().manual_seed(i)
        x, y = (
            torch.randn(16, 32, generator=generator),
            torch.randint(0, 8, (16,), generator=generator),
        )
        with precision.autocast():
            loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
        precision.backward(loss)
        optimizer.step() if direct else precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _train(precision: lowbit.Precision, model: nn.Module, steps: int = 3) -> list[float]:
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return _steps(precision, model, optimizer, range(steps))


def test_a_model_converted_by_lowbit_convert_alone_is_warned_of_at_the_first_step():
    """`lowbit.convert(model, "fp8-delayed")` with a `Precision` that never converted it trained
    without a word with current scaling (fp8-tensorwise's losses bit for bit): `step` commits the
    amax histories of the layers of the models `precision.convert` was given only."""
    model = _mlp()
    lowbit.convert(model, "fp8-delayed")
    precision = lowbit.Precision("fp8-delayed")
    with pytest.warns(UserWarning, match=r"precision\.convert\(\) was given no model") as caught:
        _train(precision, model)
    (warning,) = [w for w in caught if "given no model" in str(w.message)]  # once
    assert "fix: model = precision.convert(model)" in str(warning.message)
    assert warning.filename == __file__  # the user's line

    # the fix, on the model lowbit.convert converted: the histories move, as under convert alone
    model = _mlp()
    lowbit.convert(model, "fp8-delayed")
    precision = lowbit.Precision("fp8-delayed")
    model = precision.convert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = _train(precision, model)
    direct = lowbit.Precision("fp8-delayed")
    assert fixed == _train(direct, direct.convert(_mlp()))
    current = lowbit.Precision("fp8-tensorwise")
    assert fixed != _train(current, current.convert(_mlp()))


@pytest.mark.parametrize("recipe", ["bf16-low", "mxfp4"])
def test_a_precision_given_no_model_warns_where_its_recipe_converts_one(recipe):
    """An unconverted model under bf16-low trained its fp32 weights; under mxfp4, in bf16."""
    precision = lowbit.Precision(recipe)
    model = _mlp()
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with precision.autocast():
        loss = model(torch.randn(4, 32)).float().square().mean()
    precision.backward(loss)
    with pytest.warns(UserWarning, match=rf"recipe {recipe}, and precision\.convert\(\) was"):
        precision.step(optimizer)


def _adagrad_losses(recipe: str, dtype: torch.dtype, order: str, direct=False) -> list[float]:
    precision = lowbit.Precision(recipe)
    model = _mlp().to(dtype)
    if order == "converted first":
        model = precision.convert(model)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=1e-2)  # its sum made here
    if order == "wrapped before convert":
        optimizer = precision.wrap_optimizer(optimizer)
    model = precision.convert(model)
    if order != "not wrapped":
        optimizer = precision.wrap_optimizer(optimizer)
    losses = _steps(precision, model, optimizer, range(3), direct)
    assert optimizer.state[model[0].weight]["sum"].dtype == torch.float32
    return losses


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["built before convert", "wrapped before convert", "not wrapped"])
def test_optimizer_states_made_before_convert_casts_a_16_bit_model_up_are_cast_with_it(
    dtype, order
):
    """An fp32-parameter recipe casts a 16-bit model's parameters to fp32; Adagrad's sum, made by
    its constructor on the 16-bit parameters, stayed 16-bit: in fp16 its eps of 1e-10 is 0, and
    the first step divided 0 by 0 (NaN from the second step's loss on)."""
    losses = _adagrad_losses("fp32", dtype, order)
    assert losses == _adagrad_losses("fp32", dtype, "converted first")


@pytest.mark.parametrize("order", ["built before convert", "wrapped before convert"])
def test_a_wrapped_optimizer_stepped_by_itself_has_its_states_cast_with_the_model(order):
    """Under fp32 parameters without loss scaling a wrapped optimizer's own ``step()`` is allowed:
    its states are cast where the optimizer and the cast parameters meet, not at the step."""
    losses = _adagrad_losses("fp32", torch.float16, order, direct=True)
    assert losses == _adagrad_losses("fp32", torch.float16, "converted first")


def _delayed_run(compiled_first: bool) -> tuple[lowbit.Precision, nn.Module, torch.optim.Optimizer]:
    """fp8-delayed on the MLP, converted inside `torch.compile`'s wrapper or not; the model
    returned is the eager one either way (the layers' names are the wrapper's, and no compiling
    makes the test slow)."""
    precision = lowbit.Precision("fp8-delayed")
    model = _mlp()
    if compiled_first:
        model = precision.convert(torch.compile(model))._orig_mod
    else:
        model = precision.convert(model)
    return (
        precision,
        model,
        precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2)),
    )


def test_a_run_compiled_before_convert_resumes_uncompiled_with_its_amax_histories():
    """`torch.compile(model)` before `precision.convert` names the layers ``_orig_mod.0``, the
    uncompiled model ``0``: resumed the other way, fp8-delayed's histories were not loaded (its
    first steps scaled with the current amax) and a warning said every layer had been kept."""
    precision, model, optimizer = _delayed_run(compiled_first=True)
    _steps(precision, model, optimizer, range(3))
    # the unwrapped model's names since session 43 (the wrapper's, ``_orig_mod.0``, before)
    assert "0" in precision.conversion_report.converted
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "precision": precision.state_dict(),
        }
    )
    uninterrupted = _steps(precision, model, optimizer, range(3, 5))

    precision, model, optimizer = _delayed_run(compiled_first=False)
    precision.load_state_dict(saved["precision"])
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _steps(precision, model, optimizer, range(3, 5)) == uninterrupted


def test_a_frozen_16_bit_weight_unfrozen_after_convert_is_refused_naming_the_unfreezing():
    """Under autocast `convert` keeps a frozen 16-bit GEMM weight 16-bit; unfrozen later (gradual
    unfreezing) it is refused at the step, where the message asked whether the model was cast."""
    precision = lowbit.Precision("bf16-mixed")
    model = _mlp().to(torch.bfloat16)
    model[0].requires_grad_(False)
    model = precision.convert(model)
    assert model[0].weight.dtype == torch.bfloat16
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    model[0].requires_grad_(True)
    with precision.autocast():
        loss = model(torch.randn(4, 32)).float().square().mean()
    precision.backward(loss)
    with pytest.raises(UsageError, match=r"0\.weight is bfloat16.* unfrozen since.*fix: model = "):
        precision.step(optimizer)
    model = precision.convert(model)  # the fix
    assert model[0].weight.dtype == torch.float32
    assert precision.step(optimizer)


class _Bf16Momentum(torch.optim.Optimizer):
    """SGD with momentum kept in bf16 on purpose, whatever the parameter's dtype."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["momentum"].copy_(state["momentum"].float() * 0.9 + p.grad)
                p.add_(state["momentum"].float(), alpha=-group["lr"])


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed"])
def test_an_optimizer_built_after_convert_keeps_the_state_dtypes_it_chose(recipe):
    """`convert` casts a bf16 model's parameters to fp32; the states of an optimizer built after
    it were cast to fp32 at every step (its bf16 momentum fp32 from the second step on)."""
    precision = lowbit.Precision(recipe)
    model = precision.convert(_mlp().to(torch.bfloat16))
    optimizer = precision.wrap_optimizer(_Bf16Momentum(model.parameters()))
    for i in range(3):
        _steps(precision, model, optimizer, [i])
        assert optimizer.state[model[0].weight]["momentum"].dtype == torch.bfloat16


def _adam_run(order: str, saved: dict | None = None):
    """fp32 parameters from a bf16 model, and an Adam whose state is loaded in ``order``."""
    precision = lowbit.Precision("fp32")
    model = _mlp().to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = order.split(",")
    for step in steps:
        if step == "convert":
            model = precision.convert(model)
            if saved:
                model.load_state_dict(saved["model"])
        elif step == "wrap":
            optimizer = precision.wrap_optimizer(optimizer)
        elif saved:  # a copy: a loaded fp32 tensor (the step count) is the saved one, stepped
            optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    return precision, model, optimizer


@pytest.mark.parametrize("order", ["wrap,load,convert", "load,convert,wrap"])
def test_optimizer_states_loaded_on_the_16_bit_model_before_convert_are_warned_of(order):
    """Loaded on the bf16 model, Adam's saved fp32 moments are rounded to bf16 by torch's
    ``load_state_dict``; `convert` cast the rounded moments up, and the resumed run silently
    differed from the uninterrupted one."""
    precision, model, optimizer = _adam_run("convert,wrap")
    _steps(precision, model, optimizer, range(2))
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    uninterrupted = _steps(precision, model, optimizer, range(2, 4))

    with pytest.warns(UserWarning, match=r"Adam's states \(exp_avg, exp_avg_sq\)") as caught:
        precision, model, optimizer = _adam_run(order, saved)
    (warning,) = [w for w in caught if "Adam's states" in str(w.message)]  # once
    assert "fix: load the optimizer state after model = precision.convert(model)" in str(
        warning.message
    )
    assert warning.filename == __file__
    assert _steps(precision, model, optimizer, range(2, 4)) != uninterrupted

    with warnings.catch_warnings():  # the fix, and states made by a constructor: no warning
        warnings.simplefilter("error")
        precision, model, optimizer = _adam_run("convert,wrap,load", saved)
        assert _steps(precision, model, optimizer, range(2, 4)) == uninterrupted
        _adagrad_losses("fp32", torch.bfloat16, "wrapped before convert")


class _OwnOrigMod(nn.Module):
    """A module a user named ``_orig_mod`` (as torch.compile's wrapper names its model) beside a
    layer of the name its child has."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self._orig_mod = nn.Module()
        self._orig_mod.a = nn.Linear(32, 8)

    def forward(self, x):
        return self._orig_mod.a(self.a(x))


def test_a_module_named_orig_mod_keeps_its_layers_in_the_precision_state():
    """Precision states drop the ``_orig_mod`` parts of a compiled model's layer names; a user's
    module of that name lost them too, and its ``_orig_mod.a`` and the sibling ``a`` were both
    saved as ``a``, one layer's amax histories lost to a resumed run."""
    precision = lowbit.Precision("fp8-delayed")
    model = precision.convert(_OwnOrigMod())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    _steps(precision, model, optimizer, range(3))
    state = precision.state_dict()
    assert sorted(state["layers"]) == ["_orig_mod.a", "a"]

    resumed = lowbit.Precision("fp8-delayed")
    resumed.load_state_dict(copy.deepcopy(state))
    model = resumed.convert(_OwnOrigMod())
    for name, layer in (("a", model.a), ("_orig_mod.a", model._orig_mod.a)):
        loaded = layer.lowbit_state.state_dict()
        for operand, saved in state["layers"][name].items():  # each amax history and its fill
            assert saved["filled"] == 3 and loaded[operand]["filled"] == 3
            assert torch.equal(loaded[operand]["history"], saved["history"])

    # a state saved before the names were recorded as the uncompiled model's (a compiled
    # model's ``_orig_mod.0``) loads into the uncompiled model
    precision, model, optimizer = _delayed_run(compiled_first=False)
    _steps(precision, model, optimizer, range(2))
    legacy = precision.state_dict()
    del legacy["layer_names"]
    legacy["layers"] = {f"_orig_mod.{k}": v for k, v in legacy["layers"].items()}
    legacy["layer_specs"] = {f"_orig_mod.{k}": v for k, v in legacy["layer_specs"].items()}
    resumed, model, _ = _delayed_run(compiled_first=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(legacy)
    assert resumed.state_dict()["layers"].keys() == precision.state_dict()["layers"].keys()
