"""Each statistic against values computed by hand on small tensors, and the observer hook."""

import math

import pytest
import torch

from lowbit.diagnostics.stats import StatsCollector, operand_stats
from lowbit.formats import quantize
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitLinear
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import OperandSpec, uniform_layer


def test_exact_tensorwise_values_have_no_error():
    x = torch.tensor([[1.0, -2.0, 4.0, 0.0]])
    s = operand_stats(x, quantize(x, "fp8_e4m3"))  # scale 4/448: values 112, -224, 448, 0
    assert s["amax"] == 4.0
    assert s["scale"] == pytest.approx(4 / 448)
    assert s["saturated"] == 0 and s["underflow"] == 0 and s["nonfinite"] == 0
    assert s["sqnr"] == math.inf
    assert s["rms"] == pytest.approx(math.sqrt(21 / 4))


def test_saturation_with_a_stale_amax():
    x = torch.tensor([[1.0, -2.0, 4.0, 0.0]])
    # delayed scaling with amax 2: scale 2/448, 4.0 -> 896 > 448 clips to 448 (= 2.0)
    s = operand_stats(x, quantize(x, "fp8_e4m3", amax=torch.tensor(2.0)))
    assert s["saturated"] == 0.25
    assert s["scale"] == pytest.approx(2 / 448)
    assert s["sqnr"] == pytest.approx(10 * math.log10(21 / 4))  # error (4 - 2)^2 only
    assert s["noise_saturated"] == 1.0 and s["noise_underflow"] == 0.0


def test_underflow_counts_nonzero_values_flushed_to_zero():
    x = torch.tensor([[1000.0, 1e-6, 0.0, 0.0]])
    # scale 1000/448: 1e-6 / scale = 4.5e-7, below half of e4m3's smallest subnormal 2**-9
    s = operand_stats(x, quantize(x, "fp8_e4m3"))
    assert s["underflow"] == 0.5  # 1 of the 2 nonzero values
    assert s["noise_underflow"] == 1.0
    assert s["sqnr"] == pytest.approx(10 * math.log10((1000.0**2 + 1e-12) / 1e-12), rel=1e-6)


def test_fp16_cast_overflow_and_underflow():
    x = torch.tensor([[1e5, 1e-8, 1.0, 0.0]])
    s = operand_stats(x, quantize_operand(x, OperandSpec("fp16")))
    assert s["saturated"] == 0.25  # 1e5 > 65504 becomes inf
    assert s["nonfinite"] == 0.25
    assert s["underflow"] == pytest.approx(1 / 3)  # 1e-8 < 2**-25: flushed
    assert math.isnan(s["sqnr"])
    assert s["scale"] == 1.0


def test_mx_fp4_block_saturates_and_flushes():
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([7.0, 1.0, 0.2])
    # OCP MX scale 2**(floor(log2 7) - 2) = 1: 7 clips to 6, 0.2 < 0.25 flushes to 0
    s = operand_stats(x, quantize(x, "fp4_e2m1", "mx"))
    assert s["scale"] == 1.0
    assert s["saturated"] == pytest.approx(1 / 32)
    assert s["underflow"] == pytest.approx(1 / 3)
    assert s["sqnr"] == pytest.approx(10 * math.log10(50.04 / 1.04), rel=1e-6)
    assert s["noise_saturated"] == pytest.approx(1 / 1.04, rel=1e-6)


@pytest.mark.parametrize(
    "fmt,granularity", [("fp8_e4m3", "tensor"), ("fp6_e2m3", "mx"), ("int8", "axis")]
)
def test_sqnr_equals_the_shared_helper(fmt, granularity):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    q = quantize(x, fmt, granularity)
    assert operand_stats(x, q)["sqnr"] == pytest.approx(sqnr(x, q.dequantize()), abs=1e-6)


def test_observer_is_off_by_default_and_sees_all_six_operands():
    linear = torch.nn.Linear(64, 32)
    layer = LowbitLinear(linear, uniform_layer(OperandSpec("fp8_e4m3"), OperandSpec("fp8_e5m2")))
    model = torch.nn.Sequential(layer)
    assert layer.lowbit_state.observer is None
    collector = StatsCollector(model)
    collector.attach()
    model(torch.randn(8, 64, requires_grad=True)).square().sum().backward()
    stats = collector.collect()
    assert layer.lowbit_state.observer is None  # detached again
    ops = stats["0"]
    assert set(ops) == {
        "forward.x",
        "forward.w",
        "grad_input.grad_out",
        "grad_input.w",
        "grad_weight.grad_out",
        "grad_weight.x",
    }
    assert ops["forward.w"]["amax"] == pytest.approx(linear.weight.abs().max().item())
    assert ops["grad_input.grad_out"]["format"] == "fp8_e5m2"
    assert ops["forward.x"]["sqnr"] > 25


def test_train_cli_logs_stats_to_jsonl_and_tensorboard_and_applies_overrides(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowbit.cli import main
    from lowbit.diagnostics.stats import read_stats

    run = tmp_path / "run"
    args = ["train", "--recipe", "fp8-tensorwise", "--steps", "2", "--seq-len", "16"]
    args += ["--batch-size", "2", "--eval-batches", "1", "--device", "cpu", "--quiet"]
    args += ["--stats-interval", "2", "--override", "model.layers.0.mlp.down_proj=keep"]
    assert main([*args, "--out", str(run)]) == 0
    (step, stats), *rest = read_stats(run)
    assert step == 2 and rest == []  # only at the interval
    assert "model.layers.0.mlp.down_proj" not in stats  # kept in high precision by the override
    fwd = stats["model.layers.1.mlp.down_proj"]["forward.x"]
    assert fwd["format"] == "fp8_e4m3" and fwd["sqnr"] > 25 and fwd["saturated"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert next(r for r in records if r["split"] == "stats")["loss_scale"] == 1.0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "stats/model.layers.1.mlp.down_proj/forward.x/sqnr" in events.Tags()["scalars"]


def test_observer_of_a_hadamard_gemm_compares_each_operand_with_its_transform():
    """mxfp4's backward quantizes Hadamard transforms (K zero-padded to whole blocks): the stats
    compare each quantized operand with the transform it holds, not the raw operand."""
    from lowbit.recipes.fine_grained import mxfp4_layer

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)  # K = 40 pads to 64 in grad_input's Hadamard blocks
    layer = LowbitLinear(linear, mxfp4_layer())
    model = torch.nn.Sequential(layer)
    collector = StatsCollector(model)
    collector.attach()
    model(torch.randn(64, 96, requires_grad=True)).square().sum().backward()
    ops = collector.collect()["0"]
    for name in ("grad_input.grad_out", "grad_input.w", "grad_weight.grad_out", "grad_weight.x"):
        assert ops[name]["format"] == "fp4_e2m1"
        assert 12 < ops[name]["sqnr"] < 20  # ~15.5 dB for SR fp4 of Gaussian-like data
