"""Session 28: the ``auto`` controller as a demanding user runs it."""

import pytest
import torch

import lowbit
from lowbit.diagnostics.auto import AutoPrecision
from lowbit.errors import UsageError
from tests.train.test_resume import crashed_and_resumed


def _plan_after_micro_batches(batches) -> dict:
    """The first plan of a two-layer model whose second layer reads each micro-batch as it is
    (the first is the identity), from one check step over ``batches``."""
    torch.manual_seed(0)  # the same second layer for every order of the micro-batches
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(64))
        model[0].bias.zero_()
    lowbit.convert(model, "auto")
    controller = AutoPrecision(model, "fp8")
    controller.begin()
    for x in batches:
        model(x).square().mean().backward()
    controller.finish_check(1)
    return controller.plan["1"]


def test_a_check_under_gradient_accumulation_judges_every_micro_batch_not_the_last():
    """With --grad-accum the check measured each micro-batch and kept the last one's measures:
    an outlier in an earlier micro-batch, which per-tensor fp8 flushes the rest of the tensor
    under, was not seen, and the plan depended on the order of the micro-batches. Each rung must
    pass on every tensor it quantizes in the step, as on every rank's share under DDP."""
    clean, outlier = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(1))
    outlier[0, 0] = 1e6  # per-tensor e4m3: the bulk scales below e4m3's smallest subnormal
    first = _plan_after_micro_batches([outlier, clean])
    last = _plan_after_micro_batches([clean, outlier])
    assert last["forward.x"] != "fp8"  # the outlier seen in the last micro-batch moves it up
    assert first == last


def _finite_on_rank(rank: int, world_size: int) -> bool:
    """`all_finite` of a gradient sharded FSDP-wise whose one inf lies in the last rank's shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowbit.diagnostics.auto import all_finite
    from lowbit.distributed.context import AllReduceAgreement
    from lowbit.nn.operand import set_scale_agreement

    set_scale_agreement(AllReduceAgreement(dist.new_group(backend="gloo"), torch.device("cpu")))
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.zeros(4, 3)
    full[-1, 0] = float("inf")
    parameter = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
    parameter.grad = distribute_tensor(full, mesh, [Shard(0)])
    return all_finite(1.0, [parameter])


def test_fsdp_ranks_agree_that_a_step_is_non_finite():
    """Under FSDP each rank holds a shard of every gradient, and the guard's finite check read
    its own: the rank holding an inf rolled the step back and ran it again (its collectives
    unpaired) while the others stepped on. Every rank must take the same decision."""
    from tests.distributed.helpers import on_ranks

    assert on_ranks(_finite_on_rank) == [False, False]


def _plan_on_rank(rank: int, together: bool = True) -> dict:
    """The first plan of one layer on a rank whose share of the batch is 2^14 times wider on
    rank 1 than on rank 0, with ranks that agree on scales (threads, `_TwoRanks`) or alone."""
    torch.manual_seed(0)  # the same weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    lowbit.convert(model, "auto")
    controller = AutoPrecision(model, "fp8")
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(rank)) * (2.0**14) ** rank
    controller.begin()
    model.forward(x.requires_grad_()).square().mean().backward()  # `forward`: no input layer
    controller.finish_check(1)
    return controller.plan["0"]


def test_data_parallel_ranks_judge_a_tensorwise_rung_with_the_scale_they_agree_on():
    """Under DDP a tensorwise fp8 operand is quantized with the amax agreed over the ranks, but
    the check measured each rank's share with its own scale: rank 0's narrow activations passed
    fp8 alone, and the plan put them on fp8, where the scale of rank 1's wide ones flushes them."""
    from tests.diagnostics.test_hunt_s21 import _on_two_ranks

    assert _plan_on_rank(0)["forward.x"] == _plan_on_rank(1)["forward.x"] == "fp8"  # alone
    plans = _on_two_ranks(_plan_on_rank)
    assert plans[0] == plans[1]
    assert plans[0]["forward.x"] != "fp8"


def test_auto_fp6_describes_its_own_ladder(capsys):
    """`lowbit recipes auto:fp6` said "(fp6 and fp4 in MX blocks)": auto:fp6 never uses fp4."""
    from lowbit.cli import main

    assert main(["recipes", "auto:fp6", "auto:fp4"]) == 0
    fp6, fp4 = (line for line in capsys.readouterr().out.splitlines() if "dynamic" in line)
    assert "fp4" not in fp6 and "(fp6 in MX blocks)" in fp6
    assert "(fp6 and fp4 in MX blocks)" in fp4


def test_an_auto_budget_in_another_case_is_refused_with_its_spelling(capsys):
    """A config file's 'auto:FP4' was refused without the fix that `--recipe FP8-tensorwise`
    gets: the budget spelt as lowbit spells it."""
    from lowbit.cli import main

    assert main(["recipes", "auto:FP4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown auto budget 'FP4'" in err
    assert "fix: did you mean 'auto:fp4'?" in err


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("budget", "fp5", "unknown auto budget 'fp5'"),
        ("budget", None, "unknown auto budget None"),
        ("check_interval", 0, "check_interval must be a whole number of at least 1, got 0"),
        ("check_interval", 2.5, "check_interval must be a whole number"),
        ("patience", 0, "patience must be a whole number of at least 1"),
        ("max_retries", -1, "max_retries must be a whole number of at least 0"),
        ("max_saturated", 2.0, "max_saturated is a share of the elements, from 0 to 1"),
        ("max_underflow", "0.01", "max_underflow is a share"),
        ("min_sqnr", float("nan"), "min_sqnr is a finite number of dB"),
    ],
)
def test_bad_auto_options_are_one_line_errors(option, value, says):
    """A check interval of 0 divided by zero at the second step (ZeroDivisionError), an unknown
    budget was tuple.index's ValueError, a threshold given as a string a TypeError at the first
    check: each is refused where it is given, naming the option and the fix."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    lowbit.convert(model, "auto")
    with pytest.raises(UsageError) as refused:
        AutoPrecision(model, **{option: value})
    message = str(refused.value)
    assert says in message and "\n" not in message
    assert option == "budget" or "fix: e.g." in message


def test_an_interrupted_auto_run_resumes_bit_identically(lm_config, tmp_path, monkeypatch):
    """Checks every 2 steps, so the plan's hysteresis counters (two checks before an operand moves
    down) span the checkpoint: the resumed run must plan, log and train as the straight one."""
    import json

    from lowbit.diagnostics import auto, monitor
    from lowbit.train import checkpoint, train

    def often(model, recipe, **options):
        return auto.controller_for(model, recipe, check_interval=2, **options)

    monkeypatch.setattr(monitor, "controller_for", often)
    settings = {"model": "nano", "recipe": "auto:fp4", "steps": 6, "eval_interval": 2}
    settings["grad_accum"] = 2
    straight = train(lm_config(**settings, out=str(tmp_path / "a")), quiet=True)

    # a crash at step 5, after the checkpoint of step 4
    resumed = crashed_and_resumed(lm_config(**settings, out=str(tmp_path / "b")), 5)
    assert resumed.train_loss == straight.train_loss
    a, b = (checkpoint.load(checkpoint.latest(tmp_path / run)) for run in "ab")
    assert a["monitor"] == b["monitor"] and len(a["monitor"]["auto"]["history"]) > 1
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])

    def plans(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["split"] in ("auto", "plan")]

    assert plans("a") == plans("b")


def test_a_guard_allowed_more_retries_than_three_still_steps_on_real_gradients(
    lm_config, monkeypatch
):
    """The trainer capped the guard's rollbacks at 3 of its own: a controller allowing more ended
    the loop on a rollback, and the step updated with zeroed gradients, silently."""
    from lowbit.diagnostics import auto, monitor
    from lowbit.train import train

    def patient(model, recipe, **options):
        return auto.controller_for(model, recipe, max_retries=5, **options)

    verdicts = iter([False] * 4 + [True] * 100)  # four rolled-back attempts, then a finite one
    before = {}

    def finite(loss, parameters):
        parameters = list(parameters)
        if not before:
            before.update({id(p): p.detach().clone() for p in parameters})
        return next(verdicts)

    monkeypatch.setattr(monitor, "controller_for", patient)
    monkeypatch.setattr(monitor, "all_finite", finite)
    moved = []

    def check(trainer):
        moved.extend(not torch.equal(before[id(p)], p) for p in trainer.params if id(p) in before)

    train(lm_config(model="nano", recipe="auto", steps=1), quiet=True, on_step=check)
    assert moved and all(moved)


def test_a_plan_of_no_operands_has_no_mean_bits(tmp_path):
    """Every layer kept by overrides: the auto record said mean_bits 0.00 (and 0% at 8 bits)."""
    import json

    from lowbit.diagnostics.auto import AutoPrecision, plan_over_time

    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    from lowbit.recipes import parse_override

    recipe = lowbit.get_recipe("auto")
    lowbit.convert(model, recipe.with_overrides(parse_override("0=fp32", recipe)))
    summary = AutoPrecision(model, "fp8").summary()
    assert summary["mean_bits"] is None and summary["frac_8bit_or_below"] is None
    record = {"split": "auto", "step": 1, **summary}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert "| 1 | 0 | 0 | 0 | n/a | n/a | 0 | 0 |" in plan_over_time(tmp_path)
