"""Edge cases of `cast` and `quantize`: mixed 16-bit dtypes, e8m0 saturation, the sign of zero under
stochastic rounding, empty tensors, and folded operands of tiny data."""

import numpy as np
import pytest
import torch

from lowbit.formats import cast, cast_reference, quantize
from tests.formats.conftest import REFERENCE_TYPES, SMALL_FORMATS
from tests.formats.test_fast_paths import assert_same_bits


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit dtype (NaNs, infs and subnormals included)."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.float16),
        ("fp16", torch.bfloat16),
        ("fp32", torch.bfloat16),
        ("fp32", torch.float16),
        ("tf32", torch.float16),
    ],
    ids=str,
)
def test_casting_a_16_bit_tensor_to_the_other_16_bit_format_rounds_once_more(name, dtype):
    """fp16 -> bf16 and bf16 -> fp16 (documented: the fp32 result is rounded again to x's dtype):
    ml_dtypes' RNE of the saturated value, then x's dtype, never an error or an overflow to inf
    from a bound that x's dtype cannot hold (bf16 has no 65504, fp16 no 3.4e38)."""
    x = every_value(dtype)
    out = cast(x, name)
    assert_same_bits(out, cast_reference(x, name))
    if name in REFERENCE_TYPES:
        limit = 65504.0 if name == "fp16" else 3.3895313892515355e38
        with np.errstate(invalid="ignore", over="ignore"):
            expected = np.clip(x.float().numpy(), -limit, limit).astype(REFERENCE_TYPES[name])
        assert_same_bits(out, torch.from_numpy(expected.astype(np.float32)).to(dtype))
    if name == "fp16":  # saturation: 65504 in bf16 is 65536, not inf
        big = torch.tensor([7e4, -1e30, float("inf")], dtype=torch.bfloat16)
        assert cast(big, "fp16").tolist() == [65536.0, -65536.0, 65536.0]


def test_e8m0_saturates_inf_like_every_overflow():
    """+inf is above every e8m0 value: it saturates to 2**127, as 3e38 does (never 1.0)."""
    x = torch.tensor([float("inf"), 3e38, 2.0**127, float("nan"), -float("inf")])
    out = cast(x, "e8m0")
    assert out[:3].tolist() == [2.0**127] * 3
    assert torch.isnan(out[3:]).all()


@pytest.mark.parametrize("name", [*SMALL_FORMATS, "fp16", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stochastic_rounding_keeps_the_sign_of_zero(name, dtype):
    """-0.0 is a value of every float format, so stochastic rounding leaves it as it is; a negative
    value that rounds to zero gives -0.0, as round-to-nearest does (IEEE-754)."""
    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30] * 16, dtype=dtype)
    out = cast(x, name, "stochastic", generator=torch.Generator().manual_seed(0))
    assert (out == 0).all()
    assert torch.equal(torch.signbit(out), torch.signbit(x))
    assert_same_bits(out, cast(x, name))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1"])
def test_stochastic_quantization_keeps_negative_zeros(name, quantize_path):
    x = torch.randn(4, 64)
    x[0] = -0.0
    x[1, :31] = -1e-30  # far below the grid spacing of its block (amax 1): rounds to -0.0
    x[1, 31] = 1.0
    q = quantize(x, name, "mx", rounding="stochastic", generator=torch.Generator().manual_seed(0))
    zero = q.values[:2, :31]
    assert (zero == 0).all() and torch.signbit(zero).all()


GRANULARITIES = [
    ("fp8_e4m3", "tensor", None),
    ("fp8_e4m3", "axis", None),
    ("fp8_e4m3", "block", 32),
    ("fp8_e4m3", "block2d", (4, 32)),
    ("fp8_e4m3", "mx", None),
    ("fp4_e2m1", "nvfp4", None),
    ("fp4_e2m1", "nvfp4", (16, 16)),
    ("int8", "axis", None),
    ("bf16", "tensor", None),
]


EMPTY_CASES = [
    (*case, shape)
    for case in GRANULARITIES
    for shape in [(0, 64), (4, 0), (2, 0, 3)]
    if case[1] != "block2d" or len(shape) == 2  # 2-D blocks tile matrices
]


@pytest.mark.parametrize(("name", "granularity", "block", "shape"), EMPTY_CASES, ids=str)
@pytest.mark.parametrize("axis", [-1, 0])
def test_empty_tensors_quantize_to_empty_values(
    name, granularity, block, shape, axis, quantize_path
):
    x = torch.zeros(shape)
    q = quantize(x, name, granularity, block_size=block, axis=axis)
    assert q.values.shape == x.shape
    assert q.dequantize().shape == x.shape
    assert q.scale.numel() == 0


@pytest.mark.parametrize(
    ("name", "rule"), [("fp8_e4m3", "mx_floor"), ("fp8_e5m2", "mx_ceil"), ("fp6_e2m3", "mx_floor")]
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_values_of_a_folded_only_quantization_of_tiny_data_are_the_written_ones(
    name, rule, rounding
):
    """Data around 1e-40 takes e8m0's smallest scale, 2**-127, and values times it fall below bf16's
    subnormals: the folded operand cannot give the values back, so they must still be right."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 1e-40
    options = dict(scale_rule=rule, rounding=rounding, fold=True)
    kept = quantize(x, name, "mx", generator=torch.Generator().manual_seed(1), **options)
    folded_only = quantize(
        x, name, "mx", generator=torch.Generator().manual_seed(1), keep_values=False, **options
    )
    assert (kept.scale == 2.0**-127).all()
    assert_same_bits(folded_only.values, kept.values)
    assert_same_bits(folded_only.folded, kept.folded)


@pytest.mark.parametrize("rule", ["mx_floor", "mx_ceil"])
def test_values_of_a_folded_only_quantization_with_an_inf_block_are_the_written_ones(rule):
    """A block holding inf has the e8m0 NaN scale (e8m0 has no inf): its elements are NaN, and
    so is its fold; the values read back are the ones the PyTorch path (and keep_values=True)
    gives, and the other blocks keep theirs."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[1, 3] = float("inf")
    kept = quantize(x, "fp8_e4m3", "mx", scale_rule=rule, fold=True)
    folded_only = quantize(x, "fp8_e4m3", "mx", scale_rule=rule, fold=True, keep_values=False)
    assert kept.scale[1, 0].isnan()
    assert_same_bits(folded_only.values, kept.values)
    assert folded_only.values[1, :32].isnan().all()
    assert torch.isfinite(folded_only.values[1, 32:]).all()
