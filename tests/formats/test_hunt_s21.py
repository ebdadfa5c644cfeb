"""Bugs found by a bug hunt through the public interfaces of `lowbit.formats` (session 21): inputs
that were quietly taken for something else, and roundings that were quietly another one."""

import numpy as np
import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import cast, quantize
from tests.formats.test_fast_paths import assert_same_bits


@pytest.mark.parametrize(("shape", "axis"), [((4, 64), 2), ((4, 64), -3), ((2, 3, 32), 3), ((), 1)])
def test_an_axis_beyond_the_tensor_is_refused_not_wrapped_around(shape, axis, quantize_path):
    """axis=2 of a matrix was taken modulo 2 and quantized its columns (axis 0) instead."""
    x = torch.randn(shape)
    with pytest.raises(UsageError, match=f"axis {axis} is out of range"):
        quantize(x, "fp8_e4m3", "axis", axis=axis)


def test_every_axis_inside_the_tensor_is_still_taken(quantize_path):
    x = torch.randn(3, 4, 32)
    for axis in range(-3, 3):
        q = quantize(x, "fp8_e4m3", "axis", axis=axis)
        assert q.axis == axis % 3
        assert_same_bits(
            q.values, quantize(x.movedim(axis, -1), "fp8_e4m3", "axis").values.movedim(-1, axis)
        )
    scalar = torch.tensor(3.3)
    assert_same_bits(
        quantize(scalar, "fp8_e4m3", axis=0).values, quantize(scalar, "fp8_e4m3").values
    )


@pytest.mark.parametrize(
    ("granularity", "block_size", "message"),
    [
        ("block", 0, "at least 1"),  # was ZeroDivisionError
        ("block", -32, "at least 1"),  # was a RuntimeError of the kernel
        ("mx", 0, "at least 1"),  # was quietly MX's 32
        ("nvfp4", 0, "at least 1"),  # was quietly NVFP4's 16
        ("nvfp4", (16, 0), "at least 1"),
        ("block2d", (0, 4), "at least 1"),
        ("block", 32.5, "whole numbers"),
        ("block2d", (4,), "a pair"),  # was IndexError
        ("block", (1, 32), "one length"),  # was TypeError
        ("mx", (1, 32), "one length"),  # was a tuple inside the block shape
    ],
    ids=str,
)
def test_block_sizes_that_cannot_cut_a_matrix_are_refused(
    granularity, block_size, message, quantize_path
):
    fmt = "fp4_e2m1" if granularity == "nvfp4" else "fp8_e4m3"
    with pytest.raises(UsageError, match=message):
        quantize(torch.randn(32, 64), fmt, granularity, block_size=block_size)


def test_numpy_integers_are_block_sizes_like_python_ones(quantize_path):
    x = torch.randn(8, 64)
    for granularity, size in [("block2d", 4), ("mx", 16), ("block", 32)]:
        q = quantize(x, "fp8_e4m3", granularity, block_size=np.int64(size))
        assert_same_bits(q.values, quantize(x, "fp8_e4m3", granularity, block_size=size).values)


@pytest.mark.parametrize("x", [1.4, 1.0 + 2**-10, 1.9 * 2.0**100, 1.25 * 2.0**-120], ids=str)
def test_stochastic_rounding_to_e8m0_is_unbiased_between_its_two_neighbours(x):
    """cast(x, "e8m0", "stochastic") was round-to-nearest: 1.4 always gave 1.0 (biased by -29%)."""
    draws = torch.full((200_000,), x)
    out = cast(draws, "e8m0", "stochastic", generator=torch.Generator().manual_seed(0))
    low = 2.0 ** np.floor(np.log2(x))
    assert set(out.unique().tolist()) <= {low, 2 * low}
    up = (out == 2 * low).double().mean().item()
    fraction = x / low - 1
    assert abs(up - fraction) < 5 * np.sqrt(max(fraction * (1 - fraction), 1e-6) / draws.numel())
    again = cast(draws, "e8m0", "stochastic", generator=torch.Generator().manual_seed(0))
    assert_same_bits(out, again)


def test_stochastic_rounding_to_e8m0_keeps_its_limits():
    """Powers of two are fixed points, values above 2**127 saturate, non-positive values have no
    encoding (NaN), values below 2**-127 take 2**-127 (no zero): as nearest rounding does."""
    x = torch.tensor([1.0, 2.0**-127, 2.0**127, float("inf"), 3e38, 1e-45, 0.0, -1.0, float("nan")])
    out = cast(x, "e8m0", "stochastic", generator=torch.Generator().manual_seed(3))
    assert out[:6].tolist() == [1.0, 2.0**-127, 2.0**127, 2.0**127, 2.0**127, 2.0**-127]
    assert torch.isnan(out[6:]).all()


@pytest.mark.parametrize("granularity", ["tensor", "axis", "mx"])
def test_quantizing_elements_to_the_e8m0_scale_format_is_refused(granularity, quantize_path):
    """e8m0 has no sign and no zero: every value <= 0 came back NaN."""
    with pytest.raises(UsageError, match="e8m0 is a scale format"):
        quantize(torch.randn(4, 64), "e8m0", granularity)


@pytest.mark.parametrize(("fmt", "granularity"), [("fp8_e4m3", "tensor"), ("fp4_e2m1", "nvfp4")])
def test_an_external_amax_may_be_a_python_number(fmt, granularity, quantize_path):
    """The docstring's "a scalar" was a tensor only (AttributeError, or the kernel's RuntimeError)."""
    x = torch.randn(4, 64)
    by_number = quantize(x, fmt, granularity, amax=3.0)
    by_tensor = quantize(x, fmt, granularity, amax=torch.tensor(3.0))
    assert_same_bits(by_number.values, by_tensor.values)
    assert_same_bits(by_number.scale, by_tensor.scale)


@pytest.mark.parametrize(("fmt", "granularity"), [("fp8_e4m3", "tensor"), ("fp4_e2m1", "nvfp4")])
def test_an_external_amax_of_several_values_is_refused_where_one_is_taken(
    fmt, granularity, quantize_path
):
    with pytest.raises(UsageError, match="takes one amax"):
        quantize(torch.randn(4, 64), fmt, granularity, amax=torch.ones(4))


@pytest.mark.parametrize(
    "name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "bf16"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_that_requires_grad_casts_to_the_values_of_a_plain_one(name, dtype):
    """cast(parameter, "fp8_e4m3") raised "copysign(): functions with out=... arguments don't
    support automatic differentiation" (fp8 e4m3, fp6 and fp4, nearest), so a straight-through
    estimator ``w + (cast(w, fmt) - w).detach()`` worked for e5m2 and failed for e4m3."""
    weight = torch.nn.Parameter(torch.randn(8, 32, dtype=dtype) * 100)
    out = cast(weight, name)
    with torch.no_grad():
        assert_same_bits(out.detach(), cast(weight, name))
    (weight + (out - weight).detach()).sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: quantize(x, "fp8_e4m3", "rowwise"), "unknown granularity 'rowwise'; valid: "),
        (lambda x: quantize(x, "fp8_e4m3", scale_rule="ceil"), "unknown scale rule 'ceil'; valid"),
        (lambda x: quantize(x, "fp8_e4m3", rounding="sr"), "unknown rounding 'sr'; valid: nearest"),
        (lambda x: cast(x, "fp8_e4m3", "sr"), "unknown rounding 'sr'; valid: nearest"),
    ],
)
def test_an_unknown_granularity_scale_rule_or_rounding_lists_the_valid_ones(call, message):
    """They raised the enum's bare ValueError ("'rowwise' is not a valid Granularity")."""
    with pytest.raises(UsageError, match=message):
        call(torch.randn(4, 32))
