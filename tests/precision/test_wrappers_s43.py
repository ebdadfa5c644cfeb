"""Session 43: a model wrapped before `Precision.convert` (DistributedDataParallel, DataParallel,
torch.compile of the model or of one layer) is converted, named and saved as the unwrapped one."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UsageError
from lowbit.recipes import parse_override
from tests.precision.small_mlp import _mlp, _steps


def _wrap(model: nn.Module, how: str) -> nn.Module:
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if how == "dataparallel":  # on a CPU it calls the model itself
        return nn.DataParallel(model)
    return model


def _run(how: str) -> tuple[lowbit.Precision, nn.Module, nn.Module, torch.optim.Optimizer]:
    """fp8-delayed on the MLP wrapped ``how`` before `precision.convert`: the precision, the model
    to call, the unwrapped model and the optimizer."""
    precision = lowbit.Precision("fp8-delayed")
    model = _mlp()
    called = precision.convert(_wrap(model, how))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return precision, called, model, optimizer


@pytest.mark.parametrize(
    ("saved", "resumed"), [("ddp", "plain"), ("plain", "ddp"), ("dataparallel", "plain")]
)
def test_a_run_converted_inside_a_wrapper_resumes_outside_it_bit_for_bit(
    group_of_one, saved, resumed
):
    """`precision.convert(DDP(model))` named the layers ``module.0``: its state did not load into
    the unwrapped model (evaluation, a single-process resume), fp8-delayed's amax histories were
    dropped with a warning that every layer had been kept, and the converse."""
    precision, called, model, optimizer = _run(saved)
    _steps(precision, called, optimizer, range(3))
    assert sorted(precision.state_dict()["layers"]) == ["0", "2", "4"]  # the unwrapped model's
    state = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "precision": precision.state_dict(),
        }
    )
    uninterrupted = _steps(precision, called, optimizer, range(3, 5))

    precision, called, model, optimizer = _run(resumed)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.load_state_dict(state["precision"])
        assert _steps(precision, called, optimizer, range(3, 5)) == uninterrupted


@pytest.mark.parametrize("how", ["ddp", "dataparallel", "compile"])
def test_overrides_and_the_report_name_the_layers_of_the_unwrapped_model(group_of_one, how):
    """An override written for the model (``2=keep``, as ``lowbit train --override`` names the
    layers) applied to no layer of a wrapped one (``module.2``, ``_orig_mod.2``): the layer was
    converted, and the report said the override applies to no layer."""
    recipe = lowbit.get_recipe("fp8-tensorwise")
    recipe = recipe.with_overrides(parse_override("2=keep", recipe))
    model = _mlp()
    wrapped = torch.compile(model) if how == "compile" else _wrap(model, how)
    precision = lowbit.Precision(recipe)
    precision.convert(wrapped)
    report = precision.conversion_report
    assert sorted(report.converted) == ["0", "4"]
    assert list(report.kept) == ["2"]
    assert report.unused_overrides == []
    assert type(model[2]) is nn.Linear
    assert sorted(lowbit.nn.lowbit_layers(wrapped)) == ["0", "4"]


def test_a_model_converted_wrapped_and_again_unwrapped_is_one_model(group_of_one):
    """Converting the unwrapped model again (after adding a layer) converts the same model: its
    layers appear once in the state, not also as a second model's (``1:0``)."""
    precision = lowbit.Precision("fp8-tensorwise")
    model = _mlp()
    precision.convert(_wrap(model, "ddp"))
    precision.convert(model)
    assert sorted(precision.state_dict()["layers"]) == ["0", "2", "4"]


def test_a_layer_compiled_before_convert_computes_in_the_recipe_s_formats():
    """``model[0] = torch.compile(model[0])`` before `precision.convert`: the converted layer was
    put inside the compiled wrapper, whose forward still called the original ``nn.Linear``, so the
    layer computed in fp32 without a word (and was reported as converted, ``0._orig_mod``)."""
    eager = _mlp()
    reference = lowbit.Precision("fp8-tensorwise")
    reference.convert(eager)
    model = _mlp()
    model[0] = torch.compile(model[0], backend="eager")
    precision = lowbit.Precision("fp8-tensorwise")
    precision.convert(model)
    assert sorted(precision.conversion_report.converted) == ["0", "2", "4"]
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), eager(x))
    assert not torch.equal(model(x), _mlp()(x))  # (the fp32 model's outputs differ)


def test_a_bare_compiled_layer_is_converted_as_a_bare_layer():
    """`precision.convert(torch.compile(nn.Linear(...)))` converts the layer (named ``0``, as a
    bare layer is) and returns the compiled wrapper, which computes the converted layer."""
    layer = _mlp()[0]
    expected = lowbit.Precision("fp8-tensorwise").convert(copy.deepcopy(layer))
    precision = lowbit.Precision("fp8-tensorwise")
    compiled = precision.convert(torch.compile(layer, backend="eager"))
    assert list(precision.conversion_report.converted) == ["0"]
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(compiled(x), expected(x))


def test_lowbit_convert_refuses_a_bare_compiled_layer_as_a_bare_layer():
    """`lowbit.convert(torch.compile(layer), recipe)` swapped the layer inside the wrapper under the
    name ``""`` (no override could name it); a bare layer is refused, with the fix."""
    compiled = torch.compile(_mlp()[0], backend="eager")
    with pytest.raises(UsageError, match=r"a bare Linear has no parent .*fix: "):
        lowbit.convert(compiled, "fp8-tensorwise")
    assert type(compiled._orig_mod) is nn.Linear
