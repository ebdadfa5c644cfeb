"""Session 34: a 16-bit parameter recipe refuses weights its dtype would hold as inf."""

import pytest
import torch

from lowbit import Precision
from lowbit.errors import UsageError


def _model(value: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[2, 3] = value
    return model


@pytest.mark.parametrize("value", [1e6, -70000.0])
def test_fp16_parameters_refuse_a_weight_beyond_fp16(value):
    """fp16-low's model.to(fp16) turned the weight into inf without a word, and the fp32 master
    copy was made from it: every step overflowed until the loss scale hit its floor."""
    with pytest.raises(UsageError) as caught:
        Precision("fp16-low").convert(_model(value))
    assert str(caught.value) == (
        f"1.weight holds {abs(value):.4g}, beyond fp16's largest value 65504: fp16-low's fp16 "
        "parameters would hold it as inf; fix: a recipe with fp32 parameters (fp16-mixed, "
        "bf16-mixed) or bf16 ones (bf16-low)"
    )


@pytest.mark.parametrize(
    "recipe, value",
    [
        ("fp16-low", 65519.0),  # rounds to 65504, fp16's largest: no inf
        ("fp16-low", float("inf")),  # already inf: nothing the cast did
        ("fp16-low", float("nan")),
        ("bf16-low", 1e30),  # within bf16's range
        ("fp16-mixed", 1e6),  # fp32 parameters
    ],
)
def test_weights_the_dtype_holds_or_already_non_finite_are_converted(recipe, value):
    model = Precision(recipe).convert(_model(value))
    weight = model[1].weight
    assert weight.dtype == {"fp16-low": torch.float16, "bf16-low": torch.bfloat16}.get(
        recipe, torch.float32
    )
    expected = torch.tensor(value).to(weight.dtype)
    assert torch.equal(weight[2, 3], expected) or (expected.isnan() and weight[2, 3].isnan())


@pytest.mark.parametrize("recipe", ["fp16-low", "bf16-low"])
def test_a_model_on_the_meta_device_converts(recipe):
    """`lowbit export` and `quantize` convert a meta copy of a run's model to read its master
    weights in order: the range check read values a meta tensor does not have (a traceback for
    every bf16-low and fp16-low run)."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    converted = Precision(recipe, device="cpu").convert(model)
    assert converted[1].weight.is_meta
    assert converted[1].weight.dtype == (torch.float16 if recipe == "fp16-low" else torch.bfloat16)


def test_a_buffer_beyond_fp16_is_refused_and_bf16_names_no_bf16_recipe():
    """`model.to(fp16)` casts a floating buffer too (a scale, a table): one beyond 65504 became
    inf as a weight did. And for bf16 parameters the fix named bf16-low, the recipe refused."""
    model = _model(1.0)
    model[0].register_buffer("scale", torch.tensor([1.0, 1e6]))
    with pytest.raises(UsageError, match=r"^0\.scale holds 1e\+06, beyond fp16's"):
        Precision("fp16-low").convert(model)
    with pytest.raises(UsageError) as caught:
        Precision("bf16-low").convert(_model(3.4e38))
    assert str(caught.value).endswith(
        "bf16-low's bf16 parameters would hold it as inf; fix: a recipe with fp32 parameters "
        "(fp16-mixed, bf16-mixed)"
    )
