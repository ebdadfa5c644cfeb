"""Session 27: run.json says how a run ended, for a script reading a folder of runs."""

import json
import re

import pytest

from lowbit.cli import main
from lowbit.train import TrainConfig, train
from lowbit.train import logging as logging_module

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def _info(run) -> dict:
    return json.loads((run / "run.json").read_text())


def _validation(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "validation"]


def test_run_json_says_running_then_completed_with_the_final_metrics(tmp_path):
    run = tmp_path / "run"
    seen = []
    config = TrainConfig(
        model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=2, eval_interval=2
    )
    config.out = str(run)
    train(config, quiet=True, on_step=lambda trainer: seen.append(_info(run)["status"]))
    assert seen == ["running", "running"]
    info = _info(run)
    assert info["status"] == "completed" and info["step"] == 2
    assert info["final_metrics"]["loss"] == _validation(run)[-1]["loss"]


def test_a_diverged_run_and_a_failed_one_say_so_and_where(tmp_path, capsys, monkeypatch):
    run = tmp_path / "diverged"
    argv = ["train", *NANO, "--steps", "6", "--eval-interval", "6", "--quiet"]
    assert main([*argv, "--lr", "1e6", "--grad-clip", "0", "--out", str(run)]) == 1
    info = _info(run)
    assert info["status"] == "diverged"
    # which goes non-finite first, the loss or the gradients, depends on the CPU's kernels
    assert re.fullmatch(r"(loss|gradient norm) is (nan|inf) at step \d+", info["error"])
    assert info["step"] == int(info["error"].rsplit(" ", 1)[1]) - 1  # the last step taken

    log = logging_module.MetricsLogger.log

    def broken_at_step_3(self, step, split, metrics):
        if step == 3:
            raise RuntimeError("a bug in a metrics sink")
        return log(self, step, split, metrics)

    monkeypatch.setattr(logging_module.MetricsLogger, "log", broken_at_step_3)
    run = tmp_path / "failed"
    short = ["train", *NANO, "--steps", "4", "--eval-interval", "2", "--quiet"]
    with pytest.raises(RuntimeError, match="a bug in a metrics sink"):  # a traceback: a bug
        main([*short, "--out", str(run)])
    assert {k: _info(run).get(k) for k in ("status", "step")} == {"status": "failed", "step": 3}
    assert "a bug in a metrics sink" in _info(run)["error"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    info = _info(run)
    assert (info["status"], info["step"], info["resumed_from_step"]) == ("completed", 4, 2)
    assert "error" not in info


@pytest.mark.parametrize("command", [["train", "--resume"], ["doctor", "--checkpoint"]])
def test_a_run_folder_that_does_not_exist_is_named_so(tmp_path, capsys, command):
    """A mistyped run folder read "no config.yaml, not a lowbit run folder", as if a folder
    were there holding something else."""
    missing = tmp_path / "no-such-run"
    assert main([*command, str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    expected = "no such run folder (no config.yaml); fix: give the --out folder of a run"
    assert err == f"lowbit: error: {missing}: {expected}"
