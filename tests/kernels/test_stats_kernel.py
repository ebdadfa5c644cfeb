"""The one-pass operand statistics kernel (stats.cpp) against the PyTorch path of
`lowbit.diagnostics.stats.operand_stats_tensor`: counts and the largest |x| equal, sums equal up
to float64 summation order."""

import pytest
import torch

from lowbit import kernels
from lowbit.diagnostics.stats import operand_stats_tensor
from lowbit.formats import quantize
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import OperandSpec
from tests.formats.test_fast_paths import awkward_tensor

# (format, granularity, block size, amax): stale amaxes make values saturate
CASES = [
    ("fp8_e4m3", "tensor", None, None),
    ("fp8_e4m3", "tensor", None, 1.0),
    ("fp8_e5m2", "axis", None, None),
    ("fp8_e4m3", "block", 128, None),
    ("fp6_e2m3", "mx", None, None),
    ("fp4_e2m1", "mx", None, None),
    ("fp4_e2m1", "nvfp4", None, None),
    ("int8", "axis", None, None),
]


def both_paths(x, q):
    assert kernels.available(), f"the fused kernels did not build: {kernels.build_error()}"
    fused = operand_stats_tensor(x, q)
    with kernels.disabled():
        plain = operand_stats_tensor(x, q)
    return fused, plain


def assert_same_stats(fused, plain):
    assert fused.dtype == plain.dtype == torch.float64
    exact = [0, 2, 3, 5, 6]  # amax, saturated, flushed and non-finite fractions, median scale
    assert torch.equal(fused[exact], plain[exact]), (fused, plain)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize(("fmt", "granularity", "block", "amax"), CASES)
def test_kernel_equals_the_pytorch_path(fmt, granularity, block, amax):
    x = awkward_tensor((96, 256))
    kwargs = {} if block is None else {"block_size": block}
    if amax is not None:
        kwargs["amax"] = torch.tensor(amax)
    fused, plain = both_paths(x, quantize(x, fmt, granularity, **kwargs))
    assert_same_stats(fused, plain)
    if amax is not None:
        assert fused[2] > 0  # the stale amax saturated some values


def test_non_finite_inputs_and_casts_that_overflow():
    x = torch.randn(64, 130, generator=torch.Generator().manual_seed(3)) * 1e3
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), float("nan"), 1e6  # 1e6 overflows fp16
    fused, plain = both_paths(x, quantize_operand(x, OperandSpec("fp16")))
    assert_same_stats(fused, plain)
    assert fused[6] > 0


def test_transposed_bf16_operand_and_several_threads():
    threads = torch.get_num_threads()
    x = awkward_tensor((300, 200), torch.bfloat16).t()  # a grad_weight operand's layout
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            fused, plain = both_paths(x, quantize(x, "fp8_e4m3", "axis"))
            assert_same_stats(fused, plain)
    finally:
        torch.set_num_threads(threads)


def test_squares_of_huge_and_tiny_values_stay_finite_and_nonzero():
    """x^2 and (x - d)^2 in float64 on both paths: near fp32's max and down to its subnormals
    they neither overflow (sum x^2 inf: SQNR nan) nor flush to zero."""
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    x[:32] *= 2.0**100  # ~1e30, squares beyond fp32's max
    x[32:] *= 2.0**-100  # ~1e-30, squares below fp32's smallest subnormal
    x[0, 0] = torch.finfo(torch.float32).max
    for q in (quantize(x, "fp8_e4m3", "axis"), quantize(x, "fp4_e2m1", "mx")):
        fused, plain = both_paths(x, q)
        assert_same_stats(fused, plain)
        assert torch.isfinite(fused).all() and (fused[[1, 4, 9]] > 0).all(), fused
