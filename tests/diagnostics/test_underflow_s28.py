"""Underflow of operands already in their 16-bit format (fp16-low's fp16 gradients): their cast to
fp16 is an identity that flushes nothing, so the statistics read 0 underflow and the doctor missed
the gradient underflow it names under fp16-mixed. Their subnormals count as flushed now, on the
fused kernel's path and the PyTorch path alike."""

import json

import pytest
import torch

from lowbit import kernels
from lowbit.cli import main
from lowbit.diagnostics.doctor import failure_patterns
from lowbit.diagnostics.stats import operand_stats, operand_stats_tensor
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import OperandSpec

BASE = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--device", "cpu"]


def _stats_both_paths(x, q):
    assert kernels.available(), f"the fused kernels did not build: {kernels.build_error()}"
    fused = operand_stats_tensor(x, q, gradient=True)
    with kernels.disabled():
        plain = operand_stats_tensor(x, q, gradient=True)
    return fused, plain


@pytest.mark.parametrize(("dtype", "fmt"), [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_a_16_bit_operand_counts_its_subnormals_as_underflow(dtype, fmt):
    smallest_normal = torch.finfo(dtype).smallest_normal
    # 0 (not counted), two subnormals, the smallest normal, 1, and a NaN (neither)
    x = torch.tensor(
        [[0.0, smallest_normal / 4, -smallest_normal / 2**5, smallest_normal, 1.0, float("nan")]],
        dtype=dtype,
    )
    q = quantize_operand(x, OperandSpec(fmt))
    fused, plain = _stats_both_paths(x, q)
    assert torch.equal(fused[[0, 2, 3, 6]], plain[[0, 2, 3, 6]]), (fused, plain)
    assert operand_stats(x, q, gradient=True)["underflow"] == pytest.approx(2 / 5)  # of 5 nonzero
    # an activation's subnormals are what a mixed recipe's cast makes of it too: not counted
    assert operand_stats(x, q)["underflow"] == 0
    # the same values in fp32 are cast without flushing: nothing underflows (as before)
    x32 = x.float()
    assert (
        operand_stats(x32, quantize_operand(x32, OperandSpec(fmt)), gradient=True)["underflow"] == 0
    )


def test_fp16_low_doctor_names_the_gradient_underflow_fp16_mixed_names(tmp_path, capsys):
    """A loss scale of 1 leaves the tiny LM's gradients small enough to underflow fp16: fp16-mixed
    flushes them in its cast and the doctor said so; fp16-low's, computed in fp16, read 0."""
    found = {}
    for recipe in ("fp16-mixed", "fp16-low"):
        out = tmp_path / recipe
        args = ["--recipe", recipe, "--loss-scale", "1", "--probe-steps", "1", "--out", str(out)]
        assert main(["doctor", *BASE, *args]) == 0
        assert "fp16-gradient-underflow" in capsys.readouterr().out
        rows = json.loads((out / "doctor.json").read_text())["rows"]
        found[recipe] = {r["operand"] for r in rows if r["reason"] == "underflow"}
    assert "grad_weight.grad_out" in found["fp16-mixed"]
    assert "grad_weight.grad_out" in found["fp16-low"]
    # fp16-low's activations are not flagged for the subnormals fp16-mixed's casts make too
    assert all(name.endswith("grad_out") for name in found["fp16-low"]), found["fp16-low"]


def test_a_loss_scale_started_below_1_is_no_collapse():
    """A user's initial scale below 1 that the probe leaves where it was read "loss scale fell
    from 1e-08 to 1e-08 ... gradients overflow at every scale": nothing fell or overflowed. A
    scale that does fall below 1 is still a collapse."""
    probe = {
        "loss_scales": [1e-8, 1e-8],
        "initial_loss_scale": 1e-8,
        "dynamic_scaling": True,
        "per_step": [],
        "rounded_away": [],
    }
    assert failure_patterns(probe) == []
    fallen = {**probe, "loss_scales": [2.0, 0.5], "initial_loss_scale": 2.0}
    assert [f["pattern"] for f in failure_patterns(fallen)] == ["loss-scale-collapse"]
