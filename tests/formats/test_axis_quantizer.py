"""`AxisQuantizer` (a layer's per-row integer quantization with its checks done once) against
`quantize`, bit for bit."""

import dataclasses

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import quantize
from lowbit.formats.qtensor import AxisQuantizer
from tests.formats.test_fast_paths import assert_same_bits


def awkward_matrix(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows with an all-zero row, an inf, a NaN and a huge and a tiny row where they fit."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols)) * 3
    if rows >= 5:
        x[1] = 0
        x[2, 0] = float("inf")
        x[3, -1] = float("nan")
        x[4] *= 1e30 if dtype == torch.float32 else 1e3
        x[0] *= 1e-30 if dtype == torch.float32 else 1e-3
    return x.to(dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rule", [None, "amax", "pow2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (9, 1), (33, 17), (256, 344)])
@pytest.mark.parametrize("transposed", [False, True])
def test_axis_quantizer_returns_the_qtensor_quantize_returns(fmt, rule, dtype, shape, transposed):
    x = awkward_matrix(*shape, dtype)
    if transposed:  # a strided view, as a GEMM's transposed operand arrives
        x = x.t().contiguous().t()
    quantizer = AxisQuantizer(fmt, rule)
    assert quantizer.usable(x)
    ours = quantizer(x)
    theirs = quantize(x, fmt, "axis", axis=-1, scale_rule=rule, fold=True, keep_values=False)
    for field in dataclasses.fields(ours):
        mine, reference = getattr(ours, field.name), getattr(theirs, field.name)
        if isinstance(reference, torch.Tensor):
            assert_same_bits(mine, reference)
        else:
            assert mine == reference, field.name


def test_axis_quantizer_refuses_what_it_does_not_serve():
    with pytest.raises(UsageError, match="integer formats"):
        AxisQuantizer("fp8_e4m3")
    quantizer = AxisQuantizer("int8")
    assert not quantizer.usable(torch.randn(2, 3, 4))  # 2-D operands only
    assert not quantizer.usable(torch.randn(2, 3, dtype=torch.float64))  # not a kernel input
    assert not quantizer.usable(torch.zeros(0, 3))  # nothing to scale
