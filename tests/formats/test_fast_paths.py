"""Fast paths of `cast` and `quantize` against their reference paths, bit for bit."""

import sys

import pytest
import torch

from lowbit import formats
from lowbit.formats import carrier_dtype, cast_reference, quantize, tensor_amax
from lowbit.formats.cast import Rounding, _nearest_on_grid, cast_to_carrier_
from lowbit.formats.qtensor import (
    _block_amax,
    _blocked,
    _pad_to_blocks,
    block_shape,
    from_matrix,
    to_matrix,
)
from lowbit.formats.scaling import (
    Granularity,
    ScaleRule,
    default_rule,
    nvfp4_scales,
    scale_from_amax,
)
from tests.formats.conftest import SMALL_FORMATS
from tests.formats.test_cast import probe_values


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view: equality of bits, so -0.0 != +0.0 (NaNs are compared by `assert_same_bits`)."""
    t = t.contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    """Bit for bit, except that any NaN equals any NaN (payloads and NaN signs are not semantics:
    the native conversions and the arithmetic of the reference produce different ones)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        nan = torch.isnan(a)
        assert torch.equal(nan, torch.isnan(b))
        a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    assert torch.equal(bits(a), bits(b))


def special_values(name: str) -> torch.Tensor:
    fmt = formats.get(name)
    tiny = fmt.min_subnormal
    extra = [0.0, -0.0, tiny / 2, -tiny / 2, tiny / 4, -tiny / 4, tiny * 0.75, -tiny * 1.5]
    extra += [float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 3e38, -3e38]
    return torch.cat([probe_values(name), torch.tensor(extra)])


@pytest.mark.parametrize("name", [n for n in SMALL_FORMATS if n != "fp8_e5m2"])
@pytest.mark.parametrize("owned", [False, True])
def test_magic_number_rounding_equals_the_reference(name, owned):
    x = special_values(name)
    before = x.clone()
    fast = _nearest_on_grid(x.clone() if owned else x, formats.get(name), owned=owned)
    assert_same_bits(fast, cast_reference(before, name))
    if not owned:
        assert_same_bits(x, before)  # the input is left alone


CARRIER_FORMATS = [*SMALL_FORMATS, "bf16", "fp16", "fp32", "tf32", "int8", "int4"]


@pytest.mark.parametrize("name", CARRIER_FORMATS)
def test_cast_to_carrier_equals_reference_then_carrier(name):
    fmt = formats.get(name)
    x = special_values(name if name in SMALL_FORMATS else "fp8_e5m2") * 3
    if isinstance(fmt, formats.IntFormat):
        x = torch.cat([torch.randn(5000) * 10, torch.tensor([0.5, 1.5, -2.5, -0.2, 300.0, -0.0])])
    carrier = carrier_dtype(fmt)
    expected = cast_reference(x, name).to(carrier)
    assert_same_bits(cast_to_carrier_(x.clone(), fmt, carrier), expected)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sr_fast = cast_to_carrier_(x.clone(), fmt, carrier, Rounding.STOCHASTIC, gen_a)
    sr_ref = cast_reference(x, name, "stochastic", gen_b).to(carrier)
    assert_same_bits(sr_fast, sr_ref)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "bf16", "fp16"])
def test_native_conversion_a_gpu_takes_gives_the_grids_bits(monkeypatch, name):
    cast_module = sys.modules["lowbit.formats.cast"]  # `lowbit.formats.cast` is also a function
    fmt = formats.get(name)
    x = special_values(name if name in SMALL_FORMATS else "fp8_e5m2") * 3
    carrier = carrier_dtype(fmt)
    expected = cast_reference(x, name).to(carrier)
    monkeypatch.setattr(cast_module, "_native_conversion_is_fast", lambda dtype, device: True)
    assert_same_bits(cast_to_carrier_(x.clone(), fmt, carrier), expected)


@pytest.mark.parametrize("one_op", [False, True], ids=["aminmax", "norm (the GPU's)"])
def test_block_amax_equals_abs_amax_with_nan_zero_and_signed_zero_blocks(monkeypatch, one_op):
    qtensor_module = sys.modules["lowbit.formats.qtensor"]
    monkeypatch.setattr(qtensor_module, "_abs_max_in_one_op", lambda device: one_op)
    x = torch.randn(64, 256)
    x[0, :32] = 0.0
    x[1, :32] = -0.0
    x[2, 40] = float("nan")
    x[3, 70] = -float("inf")
    for block in [(64, 256), (1, 256), (1, 32), (1, 16), (16, 16), (8, 128)]:
        blocks = _blocked(x, block)
        expected = blocks.abs().amax(dim=(1, 3), keepdim=True)
        assert_same_bits(_block_amax(blocks), expected)
    strided = x.t()  # a non-contiguous whole-tensor view
    assert_same_bits(
        _block_amax(_blocked(strided, (256, 64))), strided.abs().amax().reshape(1, 1, 1, 1)
    )
    for t in (x, x[4:], x.bfloat16(), torch.zeros(3, 5), -torch.zeros(3, 5)):
        assert_same_bits(tensor_amax(t), t.abs().amax().float())


def reference_quantize(
    x, fmt, granularity, *, axis=-1, block_size=None, scale_rule=None, amax=None
):
    """The straightforward algorithm: |x| amax, divide by the scale, `cast_reference`, carrier."""
    fmt = formats.get(fmt)
    granularity = Granularity(granularity)
    rule = ScaleRule(scale_rule) if scale_rule is not None else default_rule(granularity)
    axis = axis % max(x.dim(), 1)
    matrix = to_matrix(x.float(), axis)
    rows, cols = matrix.shape
    block = block_shape(granularity, (rows, cols), block_size)
    blocks = _blocked(_pad_to_blocks(matrix, block, True), block)
    block_amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    if granularity is Granularity.NVFP4:
        scale, tensor_scale = nvfp4_scales(block_amax, block_amax.amax())
        divisor = scale * tensor_scale
        divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    else:
        if amax is not None:
            block_amax = amax.float().reshape(1, 1, 1, 1)
        scale = divisor = scale_from_amax(block_amax, fmt, rule)
    values = cast_reference(blocks / divisor, fmt)
    if granularity is Granularity.NVFP4:
        values = torch.where(scale > 0, values, torch.zeros_like(values))
    values = values.reshape(blocks.shape[0] * block[0], -1)[:rows, :cols]
    return from_matrix(values.to(carrier_dtype(fmt)), x.shape, axis), scale.reshape(
        blocks.shape[0], blocks.shape[2]
    )


def awkward_tensor(shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    x = torch.distributions.StudentT(2.0).sample(shape) * torch.exp2(
        torch.randint(-20, 20, shape, generator=gen).float()
    )
    flat = x.view(-1)
    flat[:32] = 0.0  # an all-zero block
    flat[32:64] = -0.0
    flat[64:96] *= 1e-39  # a block of fp32 subnormals
    flat[200] = -0.0
    flat[150] = 1e-45
    return x.to(dtype)


SCHEMES = [
    ("fp8_e4m3", "tensor", None, None),
    ("fp8_e4m3", "tensor", None, "pow2"),
    ("fp8_e4m3", "axis", None, None),
    ("fp8_e4m3", "axis", None, "pow2"),
    ("fp8_e4m3", "block", 128, None),
    ("fp8_e4m3", "block2d", (16, 32), None),
    ("fp8_e4m3", "mx", None, None),
    ("fp8_e4m3", "mx", None, "mx_ceil"),
    ("fp8_e5m2", "tensor", None, None),
    ("fp8_e5m2", "mx", None, None),
    ("fp6_e3m2", "mx", None, None),
    ("fp6_e2m3", "mx", None, "mx_ceil"),
    ("fp4_e2m1", "mx", None, None),
    ("fp4_e2m1", "nvfp4", None, None),
    ("fp4_e2m1", "nvfp4", (16, 16), None),
    ("int8", "axis", None, None),
    ("int4", "block", 32, None),
    ("bf16", "tensor", None, None),
    ("fp16", "axis", None, None),
]


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), SCHEMES, ids=str)
def test_quantize_equals_the_reference_algorithm(name, granularity, block, rule, quantize_path):
    cases = [
        (awkward_tensor((48, 256)), -1),
        (awkward_tensor((48, 256), torch.bfloat16), -1),
        (awkward_tensor((6, 40, 64)), 1),  # axis not last: a moved copy
        (awkward_tensor((5, 50)), -1),  # ragged: padded blocks
        (awkward_tensor((48, 256), torch.float16), -1),
        (awkward_tensor((256, 50)).t(), -1),  # transposed: along its contiguous axis
        (awkward_tensor((256, 40), torch.bfloat16).t(), -1),
        (awkward_tensor((64, 300)).t(), -1),  # transposed, rows in more than one chunk
    ]
    for x, axis in cases:
        if isinstance(block, tuple) and x.dim() != 2:
            continue
        q = quantize(x, name, granularity, axis=axis, block_size=block, scale_rule=rule)
        values, scale = reference_quantize(
            x, name, granularity, axis=axis, block_size=block, scale_rule=rule
        )
        assert_same_bits(q.values, values)
        assert_same_bits(q.scale, scale)


def test_quantize_leaves_its_input_alone_and_handles_nan_and_delayed_amax(quantize_path):
    x = awkward_tensor((32, 64))
    x[3, 5] = float("nan")
    before = x.clone()
    for name, granularity in [("fp8_e4m3", "tensor"), ("fp8_e4m3", "mx"), ("fp4_e2m1", "nvfp4")]:
        q = quantize(x, name, granularity)
        values, scale = reference_quantize(x, name, granularity)
        assert_same_bits(q.values, values)
        assert_same_bits(q.scale, scale)
    assert_same_bits(x, before)
    amax = torch.tensor(7.0)
    q = quantize(x, "fp8_e4m3", "tensor", amax=amax)
    values, _ = reference_quantize(x, "fp8_e4m3", "tensor", amax=amax)
    assert_same_bits(q.values, values)
