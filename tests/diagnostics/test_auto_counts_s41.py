"""Session 41: the ``auto`` plan counts the operands of the GEMMs that run.

The digits CNN's first convolution reads the pixels, which need no gradient: its input-gradient
GEMM never runs (the statistics leave its two operands out since session 41), yet the plan's
summary counted them, "6 fp8, 6 bf16 of 12 operands" where 10 run. A plan checkpointed before
then, which does not say which GEMMs ran, still loads."""

import json

import torch

import lowbit
from lowbit.cli import main
from lowbit.diagnostics.auto import AutoPrecision
from lowbit.models.cnn import build_cnn


def _total(summary: dict) -> int:
    return sum(n for key, n in summary.items() if key.startswith("n_"))


def test_the_digits_cnn_plan_counts_the_10_operands_that_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--task", "image-classification", "--model", "small", "--recipe", "auto"]
    assert main([*args, "--steps", "2", "--out", str(out)]) == 0
    assert "of 10 operands" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (summary,) = [r for r in records if r["split"] == "auto"]
    assert _total(summary) == 10
    low = summary["n_fp8"] + summary["n_mxfp8"]
    assert summary["frac_8bit_or_below"] == low / 10


def _controller():
    torch.manual_seed(0)
    model = build_cnn("tiny")
    lowbit.convert(model, "auto")
    return model, AutoPrecision(model, "fp8")


def _checked_step(model, controller, step: int) -> None:
    controller.begin()
    model(torch.randn(16, 1, 8, 8)).square().mean().backward()
    controller.finish_check(step)


def test_a_checkpointed_plan_keeps_its_counts_and_one_saved_before_them_loads():
    model, controller = _controller()
    _checked_step(model, controller, 1)
    assert _total(controller.summary()) == 10
    state = controller.state_dict()

    _, resumed = _controller()
    resumed.load_state_dict(state)
    assert resumed.summary() == controller.summary()
    assert resumed.describe() == controller.describe()

    # the state as the trainer saved it before session 41: every planned operand counts until
    # the next check notes which GEMMs run
    older = {key: state[key] for key in ("budget", "plan", "stable", "history", "checked")}
    older["input_layers"] = state["input_layers"]
    model, resumed = _controller()
    resumed.load_state_dict(older)
    assert resumed.plan == controller.plan
    assert _total(resumed.summary()) == 12
    _checked_step(model, resumed, 25)
    assert _total(resumed.summary()) == 10
