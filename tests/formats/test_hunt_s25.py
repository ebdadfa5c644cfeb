"""Bugs found by a bug hunt through the public interfaces of `lowbit.formats` and `lowbit formats`
(session 25): tensors of dtypes the formats do not round, empty tensors with a given amax, float64
values beyond fp32's range."""

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.formats import cast, cast_reference, quantize, tensor_amax


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool], ids=str)
@pytest.mark.parametrize("function", [cast, cast_reference], ids=lambda f: f.__name__)
def test_casting_a_tensor_that_is_not_floating_point_is_refused_naming_dtype_and_fix(
    function, dtype
):
    """cast raised a bare TypeError, and cast_reference returned the rounding in x's dtype (an
    integer dtype holds none of a format's fractions)."""
    x = torch.arange(-4, 4).to(dtype)
    name = function.__name__
    with pytest.raises(
        UsageError, match=rf"{name}\(\).*{dtype}.*fix: {name}\(x.float\(\), \.\.\.\)"
    ):
        function(x, "fp8_e4m3")
    with pytest.raises(TypeError):  # what cast raised before: code catching it still does
        function(x, "fp8_e4m3")


@pytest.mark.parametrize("function", [cast, quantize, tensor_amax], ids=lambda f: f.__name__)
def test_a_complex_tensor_is_refused_not_stripped_of_its_imaginary_part(function):
    """quantize dropped the imaginary part of a complex tensor with only PyTorch's warning;
    tensor_amax raised NotImplementedError ("aminmax_cpu" not implemented for 'ComplexFloat')."""
    x = torch.randn(4, 8, dtype=torch.complex64)
    args = (x,) if function is tensor_amax else (x, "fp8_e4m3")
    with pytest.raises(UsageError, match=r"complex64.*fix: .*x\.real and x\.imag"):
        function(*args)


@pytest.mark.parametrize("granularity", ["tensor", "axis"])
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0,)])
def test_an_empty_tensor_quantizes_with_a_given_amax_as_with_a_measured_one(shape, granularity):
    """A given amax (delayed scaling, an amax agreed between ranks) on an empty tensor failed
    laying out its scales ("shape '[0, 1]' is invalid for input of size 1"), and so did
    ``measure_amax=True`` ("shape '[]' is invalid for input of size 0")."""
    x = torch.empty(shape)
    rows = shape[0] if len(shape) > 1 else 1
    amax = torch.tensor(2.0) if granularity == "tensor" else torch.full((rows,), 2.0)
    measure = granularity == "tensor"
    given = quantize(x, "fp8_e4m3", granularity, amax=amax, measure_amax=measure)
    measured = quantize(x, "fp8_e4m3", granularity, measure_amax=measure)
    assert given.scale.shape == measured.scale.shape
    assert given.dequantize().shape == x.shape
    if measure:
        assert given.measured_amax.item() == measured.measured_amax.item() == 0.0


def test_formats_command_says_float64_values_overflow_fp32(tmp_path, capsys):
    """float64 entries beyond fp32's largest value were reported as "inf or NaN": they become inf
    in the fp32 through which every format quantizes."""
    tensors = {
        "big": torch.full((4, 8), 1e300, dtype=torch.float64),
        "mixed": torch.tensor(
            [1e39] * 16 + [float("nan")] * 8 + [1.0] * 8, dtype=torch.float64
        ).reshape(4, 8),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    assert main(["formats", "--tensor", str(tmp_path / "t.safetensors")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: big: 32 of 32 entries overflow fp32 (|x| > 3.403e+38), through which every format "
        "quantizes, so it has no SQNR; fix: scale the tensor into fp32's range (e.g. divide it by "
        "its largest |x|)",
        "note: mixed: 16 of 32 entries overflow fp32 (|x| > 3.403e+38), through which every "
        "format quantizes, and 8 are inf or NaN; its SQNR is over the others, set to 0 to "
        "quantize; fix: scale the tensor into fp32's range (e.g. divide it by its largest "
        "|x|)",
    ]


def test_formats_command_measures_fp8_tensors(tmp_path, capsys):
    """An fp8 checkpoint's tensor (float8_e4m3fn, which has no isfinite on the CPU) crashed the
    float64 overflow count with a NotImplementedError traceback."""
    weights = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    save_file({"w": weights.to(torch.float8_e4m3fn)}, str(tmp_path / "fp8.safetensors"))
    assert main(["formats", "--tensor", str(tmp_path / "fp8.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "w " in out and "note:" not in out
