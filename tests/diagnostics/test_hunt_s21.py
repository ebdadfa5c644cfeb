"""Cases found by a bug hunt through the diagnostics' public interfaces (session 21)."""

import contextlib
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.diagnostics.auto import AutoPrecision
from lowbit.diagnostics.stats import operand_stats
from lowbit.formats import quantize
from lowbit.formats.error import sqnr
from lowbit.nn.operand import ScaleAgreement, set_scale_agreement
from lowbit.recipes.auto import RUNGS

SCHEMES = [("fp8_e4m3", "tensor"), ("fp4_e2m1", "mx"), ("int8", "axis")]


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize(("fmt", "granularity"), SCHEMES)
@pytest.mark.parametrize("power", [70, -80])  # |x| up to ~5e21; down to ~1e-28 (fp32 normals)
def test_statistics_of_huge_and_tiny_finite_tensors_are_finite_and_scale_free(
    fmt, granularity, power, use_kernel
):
    """Scaling a tensor by a power of two scales its quantization exactly, so every statistic but
    amax, rms and scale is unchanged, and the SQNR equals the float64 helper's. In fp32 the
    squares overflowed (a healthy tensor read SQNR nan, which `auto` judges non-finite) or
    flushed to zero (SQNR of a tiny tensor's error came out inf or nan)."""
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    scaled = x * 2.0**power
    assert kernels.available() or not use_kernel, kernels.build_error()
    with contextlib.nullcontext() if use_kernel else kernels.disabled():
        reference = operand_stats(x, quantize(x, fmt, granularity))
        q = quantize(scaled, fmt, granularity)
        stats = operand_stats(scaled, q)
    assert math.isfinite(stats["sqnr"]) and stats["nonfinite"] == 0
    assert stats["sqnr"] == reference["sqnr"] == pytest.approx(sqnr(scaled, q.dequantize()))
    for name in ("saturated", "underflow", "noise_saturated", "noise_underflow"):
        assert stats[name] == reference[name], name
    for name in ("amax", "rms", "scale"):
        assert stats[name] == reference[name] * 2.0**power, name


@pytest.mark.parametrize("below", ["", "sub"])
def test_doctor_refuses_an_out_that_is_a_file_before_probing(tmp_path, capsys, below):
    """``--out`` naming a file (or a folder below one): a one-line error before the probe. The
    probe used to run first, then the write ended in a FileExistsError traceback."""
    from lowbit.cli import main

    blocking = tmp_path / "notes.txt"
    blocking.write_text("mine\n")
    out = blocking / below if below else blocking
    args = ["doctor", "--recipe", "fp8-tensorwise", "--probe-steps", "1", "--out", str(out)]
    assert main([*args, "--model", "nano", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert (
        error.strip()
        == f"lowbit: error: {blocking}: exists and is not a folder; fix: choose another --out"
    )
    assert blocking.read_text() == "mine\n"


def test_doctor_from_a_checkpoint_judges_the_loss_scale_from_where_the_probe_starts(lm_config):
    """A run whose fp16 loss scale backed off 2**8x in its first steps and then held steady: a
    probe of its checkpoint sees no overflow, so no collapse. It compared the probe's last scale
    with the recipe's initial one and reported the run's early back-off as a collapse "in 2
    steps", with "gradients overflow at every scale"."""
    from lowbit.diagnostics.doctor import diagnose
    from lowbit.train import train

    config = lm_config(model="nano", recipe="fp16-mixed", loss_scale=2.0**28, steps=10)
    run = train(config, quiet=True)
    records = map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
    scales = [r["loss_scale"] for r in records if r["split"] == "train"]
    assert scales[-3:] == [2.0**20] * 3  # eight overflows, then steady
    diagnosis = diagnose(config, steps=2, checkpoint_dir=run.run_dir)
    assert diagnosis.flags == []


def test_auto_measures_its_ladder_only_at_check_steps(lm_config, monkeypatch):
    """Under ``auto`` with statistics at every step (``--stats-interval 1``, and every step of a
    ``lowbit doctor`` probe) the steps between checks quantized every operand to every rung as
    well, for nothing: about three times a statistics step's cost."""
    import lowbit.nn.operand
    from lowbit.train.trainer import Trainer

    trainer = Trainer(lm_config(model="nano", recipe="auto", steps=3, stats_interval=1), quiet=True)
    quantize_operand = lowbit.nn.operand.quantize_operand
    calls = []

    def counted(*args, **kwargs):  # the controller's own calls (the layers hold the function)
        calls[-1] += 1
        return quantize_operand(*args, **kwargs)

    monkeypatch.setattr(lowbit.nn.operand, "quantize_operand", counted)
    for _ in range(3):
        calls.append(0)
        trainer.step()
        assert "stats" in dict(trainer.records)
    assert calls[0] > 0 and calls[1:] == [0, 0]  # the first step is the check; 2 and 3 are not


class _TwoRanks(ScaleAgreement):
    """Two data-parallel ranks as two threads of one process: ``amax`` returns the elementwise max
    of the tensors both hand in, as the all-reduce that `lowbit.distributed` installs does."""

    active = True

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=60)
        self.handed: dict[int, torch.Tensor] = {}

    def amax(self, amax: torch.Tensor) -> torch.Tensor:
        self.handed[threading.get_ident()] = amax
        self.barrier.wait()
        out = torch.maximum(*self.handed.values())
        self.barrier.wait()  # both have read before either hands in again
        return out


def _first_plan(rank: int) -> dict:
    """The plan of ``auto:fp4``'s first check on a rank whose share of the batch is its own;
    rank 1's has four wide channels, which the cheapest rungs flush."""
    torch.manual_seed(0)  # the same weights on every rank, as data parallelism has them
    model = torch.nn.Sequential(*(torch.nn.Linear(128, 128) for _ in range(3)))
    lowbit.convert(model, "auto:fp4")
    controller = AutoPrecision(model, "fp4")
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[:, :4] *= 2.0**10
    controller.begin()
    model.forward(x.requires_grad_()).square().mean().backward()  # `forward`: no input layer
    controller.finish_check(1)
    return controller.plan


def _on_two_ranks(fn) -> list:
    """``fn(rank)`` of ranks 0 and 1, run as two threads that agree on amaxes (`_TwoRanks`)."""
    previous = set_scale_agreement(_TwoRanks())
    try:
        with ThreadPoolExecutor(2) as ranks:
            return list(ranks.map(fn, (0, 1)))
    finally:
        set_scale_agreement(previous)


def test_data_parallel_ranks_agree_on_the_auto_plan():
    """Each rank measures its own share of the batch: alone, the ranks planned different formats
    for the same layers (under DDP with auto:fp4 on the nano LM, 97 and 95 operands on fp4),
    trained them so, and the checkpoint kept rank 0's plan only. Agreed, every rank takes the
    highest rung any rank's data needs."""
    alone = [_first_plan(rank) for rank in (0, 1)]
    assert alone[0] != alone[1]
    together = _on_two_ranks(_first_plan)
    highest = {
        layer: {op: max(rung, alone[1][layer][op], key=RUNGS.index) for op, rung in ops.items()}
        for layer, ops in alone[0].items()
    }
    assert together[0] == together[1] == highest


def _escalated(rank: int) -> dict:
    """After a non-finite step in which one operand saturated on each rank, a different one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(3)))
    lowbit.convert(model, "auto")
    controller = AutoPrecision(model, "fp8")
    controller.begin()
    model.forward(torch.randn(128, 64, requires_grad=True)).square().mean().backward()
    stats, _ = controller.finish_check(1)  # fp8 tensorwise everywhere: clipping is unbounded
    culprit = ("1", "forward.x") if rank == 0 else ("2", "grad_input.grad_out")
    stats[culprit[0]][culprit[1]]["saturated"] = 0.5
    controller.escalate(stats, 2)
    return controller.plan


def test_data_parallel_ranks_move_up_every_operand_that_overflowed_on_any_rank():
    plans = _on_two_ranks(_escalated)
    assert plans[0] == plans[1]
    moved = {(layer, op) for layer, ops in plans[0].items() for op, r in ops.items() if r != "fp8"}
    assert moved == {("1", "forward.x"), ("2", "grad_input.grad_out")}


def test_an_operand_override_under_auto_fixes_that_operand_and_leaves_the_others_to_auto():
    """``--recipe auto --override 'LAYER=OPERAND:FORMAT'``: the override's starting point is
    auto's bf16 on every operand, and the whole layer was left out of the plan, so its five other
    operands stayed in bf16 for the whole run. A preset override still fixes all six."""
    from lowbit.recipes import parse_override

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(3)))
    recipe = lowbit.get_recipe("auto")
    named = "1=forward.x:fp8_e4m3,grad_weight.grad_out:bf16"
    recipe = recipe.with_overrides(parse_override(named, recipe), parse_override("2=fp32", recipe))
    lowbit.convert(model, recipe)
    controller = AutoPrecision(model, "fp8")
    controller.begin()
    model.forward(torch.randn(256, 64, requires_grad=True)).square().mean().backward()
    controller.finish_check(1)
    formats = {op: spec.format for op, spec in model[1].lowbit_state.spec.operands().items()}
    assert formats == {
        "forward.x": "fp8_e4m3",  # the override's
        "forward.w": "fp8_e4m3",
        "grad_input.grad_out": "fp8_e5m2",
        "grad_input.w": "fp8_e4m3",
        "grad_weight.grad_out": "bf16",  # the override's
        "grad_weight.x": "fp8_e4m3",
    }
    assert set(controller.plan["1"]) == {
        "forward.w",
        "grad_input.grad_out",
        "grad_input.w",
        "grad_weight.x",
    }
    assert "2" not in controller.plan
    assert {s.format for s in model[2].lowbit_state.spec.operands().values()} == {"fp32"}


@pytest.mark.parametrize(
    "pattern", ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.gemms.up.0"]
)
def test_an_operand_override_of_experts_under_auto_fixes_only_that_operand(pattern):
    """An OPERAND:FORMAT override of a mixture-of-experts layer, or of one expert GEMM, fixed all
    six operands of the GEMMs it matched, as a preset override does."""
    from lowbit.nn import lowbit_layers
    from lowbit.recipes import parse_override
    from tests.moe import mixtral

    model = mixtral()
    recipe = lowbit.get_recipe("auto")
    lowbit.convert(
        model, recipe.with_overrides(parse_override(f"{pattern}=forward.x:fp8_e4m3", recipe))
    )
    layers = lowbit_layers(model)
    assert layers["model.layers.0.mlp.experts.gemms.up.0"].lowbit_state.fixed_operands == {
        "forward.x"
    }
    assert not layers["model.layers.1.mlp.experts.gemms.up.0"].lowbit_state.fixed_operands
