"""Session 29 correctness hunt of the number formats against their references (OCP MX v1.0,
ml_dtypes, torchao's ``to_mx``)."""

import pytest
import torch

from lowbit.formats import cast, quantize

E8M0_SMALLEST = 2.0**-127  # e8m0 code 0x00 (OCP MX v1.0 §5.4.1)


@pytest.mark.parametrize("special", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("rule", ["mx_floor", "mx_ceil"])
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1"])
def test_an_mx_block_holding_inf_or_nan_gets_the_e8m0_nan_scale(quantize_path, name, rule, special):
    """e8m0 has no inf: a block with inf (or NaN) gets the NaN scale (code 0xFF), as torchao's
    ``to_mx`` and microxcaling give, so that the whole block reads back as NaN; the other blocks
    keep their finite power-of-two scales and values."""
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x[1, 40] = special
    q = quantize(x, name, "mx", scale_rule=rule)
    assert q.scale[1, 1].isnan()
    assert torch.isfinite(q.scale[[0, 0, 1], [0, 1, 0]]).all()
    every_scale_is_e8m0 = cast(q.scale, "e8m0").isnan() == q.scale.isnan()
    assert every_scale_is_e8m0.all()
    out = q.dequantize()
    assert out[1, 32:].isnan().all()
    assert torch.isfinite(out[:, :32]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("rule", ["mx_floor", "mx_ceil"])
def test_tiny_and_zero_mx_blocks_have_e8m0_scales_and_read_back_exactly(quantize_path, rule):
    """The smallest MX scale is 2**-127 (e8m0 code 0) and a zero block's scale is an e8m0 value
    too; dequantizing such blocks is exact multiplication by a power of two."""
    x = torch.zeros(3, 32)
    x[1] = 2.0**-149 * torch.arange(32)  # fp32 subnormals: below anything e4m3 * 2**-127 holds
    x[2, :8] = 2.0**-130 * torch.arange(8)  # on e4m3's grid at scale 2**-127 (x / s = k / 8)
    q = quantize(x, "fp8_e4m3", "mx", scale_rule=rule)
    assert (q.scale >= E8M0_SMALLEST).all()
    assert torch.equal(cast(q.scale, "e8m0"), q.scale)
    assert q.scale[1, 0] == E8M0_SMALLEST and q.scale[2, 0] == E8M0_SMALLEST
    out = q.dequantize()
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(out[1], torch.zeros(32))
