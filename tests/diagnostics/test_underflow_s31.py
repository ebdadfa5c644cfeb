"""Session 31: the statistics' underflow and saturation against a direct quantize-and-count, the
doctor on non-finite inputs, and ``auto`` on all-zero operands."""

import math

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.diagnostics.auto import AutoPrecision
from lowbit.diagnostics.doctor import diagnose
from lowbit.diagnostics.stats import StatsCollector, operand_stats
from lowbit.formats import get
from lowbit.nn import LowbitLinear
from lowbit.nn.operand import AmaxHistory, quantize_operand
from lowbit.recipes import OperandSpec, uniform_layer
from lowbit.train.config import resolve

SPECS = [
    OperandSpec("fp8_e4m3"),
    OperandSpec("fp8_e5m2"),
    OperandSpec("fp8_e4m3", granularity="axis"),
    OperandSpec("int8", granularity="axis"),
    OperandSpec("fp8_e4m3", granularity="block", block_size=32),
    OperandSpec("fp8_e4m3", granularity="mx"),
    OperandSpec("fp4_e2m1", granularity="mx"),
    OperandSpec("fp4_e2m1", granularity="nvfp4"),
]


def _log_uniform(low: float, high: float, seed: int = 0) -> torch.Tensor:
    """Magnitudes log-uniform over [low, high], random signs, a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.empty(64, 256).uniform_(math.log(low), math.log(high), generator=g).exp()
    sign = torch.where(torch.rand(64, 256, generator=g) < 0.5, -1.0, 1.0)
    x = magnitude * sign
    x[:, ::17] = 0.0
    return x


def _truth(x: torch.Tensor, q) -> tuple[float, float]:
    """What the cast did, counted directly: nonzero inputs that came back zero (of the nonzero),
    and elements clipped: their cast error beyond half a step of the format's top binade (the
    most rounding loses; session 41: a value that rounds to the largest one is not clipped), where
    the scale is not zero (an NVFP4 block's rounded to zero flushes the block)."""
    d = q.dequantize()
    nonzero = x != 0
    flushed = (nonzero & (d == 0)).sum().item() / nonzero.sum().item()
    step = 1.0 if q.fmt.kind == "int" else 2.0 ** (q.fmt.emax - q.fmt.mbits)
    scale = q.expanded_scale().double()
    beyond = (x.double() - d.double()).abs() > step / 2 * scale
    clipped = (beyond & (scale > 0)).double().mean().item()
    return flushed, clipped


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("span", [(1e-12, 1e3), (1e-12, 1e-3), (1e-3, 1e8)])
def test_underflow_and_saturation_are_what_the_scaled_cast_flushes_and_clips(spec, span):
    """The lead: the doctor's underflow column might count values below the format's smallest
    subnormal unscaled ("nominal"). It does not: it is the share the cast with the spec's own
    scaling flushes, on the fused kernel's path and PyTorch's alike, here where the unscaled
    count is far off (1e-12..1e-3 lies wholly below e4m3's 2**-9; 1e-3..1e8 wholly above it)."""
    x = _log_uniform(*span)
    q = quantize_operand(x, spec)
    flushed, clipped = _truth(x, q)
    fused = operand_stats(x, q)
    with kernels.disabled():
        plain = operand_stats(x, q)
    for stats in (fused, plain):
        assert stats["underflow"] == pytest.approx(flushed, abs=1e-12)
        assert stats["saturated"] == pytest.approx(clipped, abs=1e-12)
    nonzero = x != 0
    below = nonzero & (x.abs() < get(spec.format).min_subnormal / 2)
    unscaled = below.sum().item() / nonzero.sum().item()
    if span != (1e-12, 1e3):  # there e4m3's amax ~448 makes the scale ~1: alike by chance
        assert abs(unscaled - flushed) > 0.02


def test_a_stale_delayed_amax_saturates_and_the_statistics_count_it():
    """Delayed scaling with an amax 100x below the tensor's: what clips is counted as saturated,
    and what the larger scale no longer flushes leaves the underflow, both as the cast did."""
    x = _log_uniform(1e-12, 1e3, seed=1)
    spec = OperandSpec("fp8_e4m3", scaling="delayed")
    history = AmaxHistory(4)
    quantize_operand(x / 100, spec, history=history)
    history.commit()
    stale = quantize_operand(x, spec, history=history)
    current = quantize_operand(x, OperandSpec("fp8_e4m3"))
    flushed, clipped = _truth(x, stale)
    stats = operand_stats(x, stale)
    assert stats["saturated"] == pytest.approx(clipped) and clipped > 0.1
    assert stats["underflow"] == pytest.approx(flushed)
    assert stats["underflow"] < operand_stats(x, current)["underflow"]


def test_a_layer_observer_reports_the_underflow_of_the_layer_own_cast():
    """Through a layer, as the doctor's probe collects them: forward.x's statistics are those of
    the cast the layer made with its spec (rowwise e4m3 here), counted directly."""
    spec = OperandSpec("fp8_e4m3", granularity="axis")
    layer = LowbitLinear(torch.nn.Linear(256, 8), uniform_layer(spec, OperandSpec("fp8_e5m2")))
    collector = StatsCollector(torch.nn.Sequential(layer))
    x = _log_uniform(1e-12, 1e-3, seed=2)
    collector.attach()
    layer(x).sum().backward()
    stats = collector.collect()["0"]["forward.x"]
    flushed, clipped = _truth(x, quantize_operand(x, spec))
    assert stats["underflow"] == pytest.approx(flushed) and stats["saturated"] == pytest.approx(
        clipped
    )


def test_a_nan_activation_is_one_line_naming_the_layer_not_dozens_of_overrides(lm_config):
    """A NaN entering one layer's input (before any cast) spreads to every later layer and every
    gradient: the doctor flagged 86 operands "non-finite" and suggested bf16 overrides for all 28
    layers, which fix nothing (NaN stays NaN in bf16), without saying where the NaN came in."""
    broken = "model.layers.1.mlp.down_proj"

    def nan_input(trainer):
        layer = dict(trainer.model.named_modules())[broken]

        def hook(module, args):
            x = args[0].clone()
            x[..., 0] = float("nan")
            return (x,)

        layer.register_forward_pre_hook(hook)

    diagnosis = diagnose(resolve(lm_config(recipe="fp8-tensorwise")), steps=2, prepare=nan_input)
    (flag,) = [f for f in diagnosis.flags if f["pattern"] == "non-finite-input"]
    assert (flag["layer"], flag["operand"], flag["step"]) == (broken, "forward.x", 1)
    assert diagnosis.suggestions == []
    table = diagnosis.table()
    assert f"[non-finite-input] {broken} read forward.x already inf or NaN" in table
    assert "--override" not in table
    assert all(r.nonfinite_input for r in diagnosis.flagged)


def test_an_fp16_overflow_is_suggested_its_consequences_downstream_are_not(lm_config):
    """A cast that overflows (fp16 weights beyond 65504) is the culprit, suggested in bf16; the
    inf it sends into every later layer was suggested too, an override for each of them."""

    def overflow_fp16(trainer):
        layer = dict(trainer.model.named_modules())["model.layers.0.mlp.up_proj"]
        with torch.no_grad():
            layer.weight.mul_(1e6)

    diagnosis = diagnose(resolve(lm_config(recipe="fp16-mixed")), steps=1, prepare=overflow_fp16)
    assert diagnosis.suggestions == ["model.layers.0.mlp.up_proj=forward.w:bf16,grad_input.w:bf16"]
    assert diagnosis.rows[0].layer == "model.layers.0.mlp.up_proj"
    assert not diagnosis.rows[0].nonfinite_input
    assert not [f for f in diagnosis.flags if f["pattern"] == "non-finite-input"]


def test_auto_keeps_an_all_zero_operand_where_it_is():
    """A zero-initialised weight (and the gradient flowing back through it) is exact in every
    format, so it passed every rung and the first check put it on the cheapest, MX fp4 under
    auto:fp4, for the next check_interval steps, on no evidence about the values to come."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.zero_()
    lowbit.convert(model, "auto:fp4")
    controller = AutoPrecision(model, "fp4")
    controller.begin()
    model(torch.randn(8, 64)).square().mean().backward()
    controller.finish_check(1)
    plan = controller.plan["1"]
    assert plan["forward.w"] == plan["grad_input.w"] == "bf16"
    assert plan["forward.x"] != "bf16"  # its nonzero operands are planned as before
