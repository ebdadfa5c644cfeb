"""NVFP4 scales at the edges of fp32: tensors so small that ``amax / (6 * 448)`` rounds to 0, and
tensors holding inf. Both paths (fused kernel, PyTorch) against a hand-computed NVFP4 reference
(ml_dtypes for the e4m3 and e2m1 roundings, numpy fp32 arithmetic, which keeps subnormals)."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats import quantize
from tests.formats.test_fast_paths import assert_same_bits

SMALLEST_SUBNORMAL = 2.0**-149  # fp32's smallest positive value


def nvfp4_reference(x: np.ndarray, tensor_amax: float):
    """(values, block scales, tensor scale) of 1 x 16 NVFP4 blocks of a float32 matrix: the
    paper's two levels, the tensor scale floored at fp32's smallest subnormal (a positive amax
    never gets scale 0), elements and block scales saturating, underflowed blocks zero."""
    f32 = np.float32
    if tensor_amax > 0:
        tensor_scale = max(f32(tensor_amax) / f32(6 * 448), f32(SMALLEST_SUBNORMAL))
    else:
        tensor_scale = f32(1.0)
    blocks = x.reshape(-1, 16)
    block_amax = np.abs(blocks).max(axis=1)
    ratio = np.clip(block_amax / f32(6) / tensor_scale, 0, 448)
    block_scale = ratio.astype(ml_dtypes.float8_e4m3fn).astype(f32)
    divisor = block_scale * tensor_scale
    divisor = np.where(divisor > 0, divisor, f32(1))
    scaled = np.clip(blocks / divisor[:, None], -6, 6)
    values = scaled.astype(ml_dtypes.float4_e2m1fn).astype(f32)
    values[block_scale == 0] = 0
    rows = x.shape[0]
    return (
        torch.from_numpy(values.reshape(x.shape)),
        torch.from_numpy(block_scale.reshape(rows, -1)),
        torch.tensor(tensor_scale, dtype=torch.float32),
    )


def tiny_tensor(top: float) -> torch.Tensor:
    """A 4 x 64 tensor with amax ``top``: a graded block, a block of one small value, an all-zero
    block (block amax 0: a ``0 / 0`` block scale when the tensor scale was 0) and random ones."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 64, generator=generator, dtype=torch.float64) * 2 - 1
    x[0, :16] = torch.linspace(-1, 1, 16, dtype=torch.float64)
    x[1, 16:32] = 0.25
    x[2, 32:48] = 0
    return (x * top).float()


@pytest.mark.parametrize("top", [1.8e-42, 1e-42, 3e-43, 4e-44, 1.3e-44])
def test_a_tensor_below_the_tensor_scale_range_reads_back_close(quantize_path, top):
    """amax below 6 * 448 * 2**-150 (~1.9e-42) rounded the fp32 tensor scale to 0: block scales
    were NaN (0 / 0) or 448, and the tensor read back as NaN or zeros."""
    x = tiny_tensor(top)
    q = quantize(x, "fp4_e2m1", "nvfp4")
    values, scale, tensor_scale = nvfp4_reference(x.numpy(), x.abs().max().item())
    assert tensor_scale.item() == SMALLEST_SUBNORMAL
    assert_same_bits(q.tensor_scale, tensor_scale)
    assert_same_bits(q.scale, scale)
    assert_same_bits(q.values.float(), values)
    back = q.dequantize()
    assert torch.isfinite(back).all()
    # fp4's grid near the top of a block is 4, 6 (a third apart); the tensor's largest value is
    # within that of its own
    top_index = x.abs().argmax()
    assert back.flatten()[top_index].item() == pytest.approx(x.flatten()[top_index].item(), rel=0.2)


@pytest.mark.parametrize("block_size", [None, (16, 16)], ids=["1x16", "16x16"])
def test_the_smallest_positive_tensor_is_finite(quantize_path, block_size):
    """The brief's example: 1e-45 (fp32's smallest subnormal) everywhere read back as NaN. Its
    block scale amax / 6 underflows fp32, so the blocks hold zeros: finite, 0."""
    x = torch.full((16, 32), 1e-45)
    back = quantize(x, "fp4_e2m1", "nvfp4", block_size=block_size).dequantize()
    assert torch.equal(back, torch.zeros_like(x))


def test_a_tiny_given_amax_keeps_a_positive_tensor_scale(quantize_path):
    """A delayed (given) amax of 1e-43 gave tensor scale 0 and every block scale 448 over 0."""
    x = tiny_tensor(1e-43)
    q = quantize(x, "fp4_e2m1", "nvfp4", amax=torch.tensor(1e-43))
    values, scale, tensor_scale = nvfp4_reference(x.numpy(), 1e-43)
    assert_same_bits(q.tensor_scale, tensor_scale)
    assert_same_bits(q.scale, scale)
    assert_same_bits(q.values.float(), values)
    assert torch.isfinite(q.dequantize()).all()


def test_ordinary_tensor_scales_are_unchanged(quantize_path):
    """Above the floor the tensor scale is still amax / 2688 (bits of the golden runs)."""
    for top in (4e-42, 1e-38, 1.0, 3e4):
        x = tiny_tensor(top)
        q = quantize(x, "fp4_e2m1", "nvfp4")
        amax = x.abs().max()
        assert_same_bits(q.tensor_scale, amax / (6 * 448))
        values, scale, _ = nvfp4_reference(x.numpy(), amax.item())
        assert_same_bits(q.scale, scale)
        assert_same_bits(q.values.float(), values)


@pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan])
def test_a_non_finite_element_makes_the_nvfp4_tensor_nan(quantize_path, special):
    """Kept on purpose (docs/formats.md): an inf amax is its own tensor scale, so the whole
    tensor reads back as NaN and an overflow reaches the loss scaler's finite check.
    Transformer Engine instead takes tensor scale 1 and saturates inf to 6 * 448, which would
    hide the overflow. A NaN amax takes tensor scale 1 and only the NaN's block reads as NaN."""
    x = tiny_tensor(1.0)
    x[3, 40] = special
    back = quantize(x, "fp4_e2m1", "nvfp4").dequantize()
    if math.isnan(special):
        nan_block = torch.zeros_like(x, dtype=torch.bool)
        nan_block[3, 32:48] = True
        assert torch.equal(back.isnan(), nan_block)
    else:
        assert back.isnan().all()
