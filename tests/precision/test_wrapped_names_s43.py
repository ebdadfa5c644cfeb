"""Session 43 (review of the unwrapped names): states saved by session 42 or older inside
DistributedDataParallel, overrides written with a wrapper's names, the names in refusals, and a
shallow copy of a `Precision`."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UsageError
from lowbit.recipes import parse_override
from tests.precision.small_mlp import _mlp, _steps


def _run(ddp: bool):
    """fp8-delayed on the MLP, converted inside DDP or not: the precision, the model to call, the
    unwrapped model and the optimizer."""
    precision = lowbit.Precision("fp8-delayed")
    model = _mlp()
    called = precision.convert(nn.parallel.DistributedDataParallel(model) if ddp else model)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return precision, called, model, optimizer


def _as_session_42_saved_it(state: dict, layer_names: str | None) -> dict:
    """``state`` in the format of session 42 (``layer_names: "uncompiled"``) or older (no such
    key): a model converted as ``DDP(model)`` had its layers named with DDP's ``module.`` part."""
    old = copy.deepcopy(state)
    for part in ("layers", "layer_specs"):
        old[part] = {f"module.{name}": value for name, value in state[part].items()}
    del old["layer_names"]
    if layer_names is not None:
        old["layer_names"] = layer_names
    return old


@pytest.mark.parametrize("layer_names", ["uncompiled", None])
@pytest.mark.parametrize("resumed_in_ddp", [True, False])
def test_a_ddp_state_of_session_42_or_older_resumes_bit_for_bit(
    group_of_one, layer_names, resumed_in_ddp
):
    """Such a state named the layers ``module.0``, which the unwrapped names (``0``) no longer
    matched: fp8-delayed's amax histories were dropped on resuming into the same ``DDP(model)``,
    with a warning that every layer had been converted now and kept then; it loads into the
    unwrapped model too, as a state saved since does."""
    precision, called, model, optimizer = _run(ddp=True)
    _steps(precision, called, optimizer, range(3))
    saved = {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "precision": _as_session_42_saved_it(precision.state_dict(), layer_names),
    }
    assert sorted(saved["precision"]["layers"]) == ["module.0", "module.2", "module.4"]
    uninterrupted = _steps(precision, called, optimizer, range(3, 5))

    precision, called, model, optimizer = _run(ddp=resumed_in_ddp)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.load_state_dict(saved["precision"])
        assert _steps(precision, called, optimizer, range(3, 5)) == uninterrupted
    assert sorted(precision.state_dict()["layers"]) == ["0", "2", "4"]


@pytest.mark.parametrize(
    ("how", "written"), [("dataparallel", "module.2"), ("compile", "_orig_mod.2")]
)
def test_an_override_written_with_a_wrapper_s_name_says_how_to_name_the_layer(how, written):
    """``module.2=keep`` named layer 2 of ``DataParallel(model)`` before session 43 and names no
    layer since; the report said only "lowbit doctor lists the names"."""
    recipe = lowbit.get_recipe("fp8-tensorwise")
    recipe = recipe.with_overrides(parse_override(f"{written}=keep", recipe))
    model = _mlp()
    wrapped = (
        nn.DataParallel(model) if how == "dataparallel" else torch.compile(model, backend="eager")
    )
    precision = lowbit.Precision(recipe)
    precision.convert(wrapped)
    report = precision.conversion_report
    assert report.unused_overrides == [f"{written}=keep"]
    line = report.unused_override_line(f"{written}=keep")
    assert f"name {written} as 2" in line
    assert "unwrapped model" in line


def test_a_16_bit_cast_inside_a_wrapper_is_refused_naming_the_unwrapped_parameter():
    """The refusal of ``model.half()`` under bf16-low named ``module.0.weight`` for a model
    converted as ``DataParallel(model)``, a name overrides and states do not use."""
    precision = lowbit.Precision("bf16-low")
    model = _mlp()
    called = precision.convert(nn.DataParallel(model))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    model.half()
    precision.backward(called(torch.randn(4, 32).half()).float().sum())
    with pytest.raises(UsageError, match=r"^precision\.step\(\): 0\.weight is float16"):
        precision.step(optimizer)


def test_a_shallow_copy_of_a_precision_works_as_before_pickling_was_refused():
    """``copy.copy(precision)`` went through the pickling refusal ("a lowbit.Precision is not
    pickled"); before it, it made a copy sharing the original's parts."""
    precision = lowbit.Precision("bf16-low")
    model = precision.convert(_mlp())
    precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    twin = copy.copy(precision)
    assert twin is not precision
    assert twin.update is precision.update
    assert twin.conversion_report is precision.conversion_report
    assert twin.state_dict().keys() == precision.state_dict().keys()
