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
    assert "_orig_mod.0" in precision.conversion_report.converted  # the wrapper's names
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
