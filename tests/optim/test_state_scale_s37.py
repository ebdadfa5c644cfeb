"""Quantized optimizer states code small gradients as finely as large ones (session 37).

torchao floors each block's scale at 1e-12, so a second moment below it (gradients below ~1e-6)
was coded as a fraction of 1e-12: with gradients of 1e-7, 4-bit states stalled at 0.10 of fp32's
parameter movement. Adam's update does not depend on the gradients' scale (but for eps), and a
power-of-two scale changes no rounding, so the states must give the very same update."""

import pytest
import torch

from lowbit.optim import build_optimizer

SCALE = 2.0**-40  # gradients ~1e-12, second moments ~1e-27: far below torchao's 1e-12 floor


def _moved(state_precision: str, scale: float) -> torch.Tensor:
    param = torch.nn.Parameter(torch.zeros(32, 256))
    # eps far below every sqrt(v) of either scale, so that it changes no sum
    optimizer = build_optimizer([param], lr=1e-3, eps=1e-37, state_precision=state_precision)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        # magnitudes in [0.5, 1.5): no second moment near its block's zero code
        size = torch.rand(param.shape, generator=generator) + 0.5
        sign = torch.randn(param.shape, generator=generator).sign()
        param.grad = size * sign * scale
        optimizer.step()
    return param.detach()


@pytest.mark.parametrize("state_precision", ["fp8", "8bit", "4bit"])
def test_tiny_gradients_update_as_large_ones(state_precision):
    assert torch.equal(_moved("fp32", SCALE), _moved("fp32", 1.0))  # the reference's property
    assert torch.equal(_moved(state_precision, SCALE), _moved(state_precision, 1.0))
