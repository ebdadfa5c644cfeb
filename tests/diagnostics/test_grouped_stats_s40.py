"""Session 40: the statistics of a grouped convolution's operand cover all its groups. Each group's
GEMM quantizes its own part of the operand, and the collector kept only the last part's numbers
(as a later micro-batch's): an outlier or saturation in another group was invisible to `lowbit
doctor` and the monitor (review R2: group 0's input x1000, reported amax 1.52, true 1471.5)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.diagnostics.stats import StatsCollector
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import get_recipe


def _whole(parts: list[torch.Tensor], spec) -> dict[str, float]:
    """amax, rms, underflow and SQNR of an operand quantized part by part (tensorwise: one scale
    per part), measured over the whole operand."""
    x = torch.cat([p.double() for p in parts], 1)
    d = torch.cat([quantize_operand(p.contiguous(), spec).dequantize().double() for p in parts], 1)
    nonzero = x != 0
    return {
        "amax": x.abs().max().item(),
        "rms": x.pow(2).mean().sqrt().item(),
        "underflow": ((d == 0) & nonzero).sum().item() / nonzero.sum().item(),
        "sqnr": 10 * math.log10(x.pow(2).sum().item() / (x - d).pow(2).sum().item()),
    }


@pytest.mark.parametrize("outlier_group", [0, 1])
def test_a_grouped_convolutions_statistics_cover_every_group(outlier_group):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1)
    )
    lowbit.convert(model, "fp8-tensorwise")
    spec = get_recipe("fp8-tensorwise").layer_for("1")[0]
    collector = StatsCollector(model)
    collector.attach()
    h = torch.randn(2, 4, 6, 6)
    h[:, 2 * outlier_group] *= 1000.0  # one group: outliers in its first channel
    h[:, 2 * outlier_group + 1] *= 1e-3  # and in its second values its scale flushes
    grad_out = torch.randn(2, 4, 6, 6)
    grad_out[:, 2 * outlier_group] *= 1000.0
    model[1](h.requires_grad_()).backward(grad_out)
    stats = collector.collect()["1"]

    cols = (
        F.unfold(h.detach(), 3, padding=1).transpose(1, 2).reshape(-1, 36)
    )  # N*L x C*9, 18 a group
    want = _whole(list(cols.chunk(2, 1)), spec.forward.a)
    got = stats["forward.x"]
    assert got["amax"] == pytest.approx(want["amax"], rel=1e-6)
    assert got["amax"] > 1000
    assert got["rms"] == pytest.approx(want["rms"], rel=1e-6)
    assert got["underflow"] == pytest.approx(want["underflow"], rel=1e-6)
    assert got["underflow"] > 0.2
    assert got["sqnr"] == pytest.approx(want["sqnr"], abs=1e-6)
    assert got["saturated"] == got["nonfinite"] == 0

    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, 4)  # N*L x O, 2 a group
    want = _whole(list(rows.chunk(2, 1)), spec.grad_input.a)
    got = stats["grad_input.grad_out"]
    assert got["amax"] == pytest.approx(want["amax"], rel=1e-6)
    assert got["amax"] > 1000
    assert got["sqnr"] == pytest.approx(want["sqnr"], abs=1e-6)
