"""What a Ctrl-C says as it stops a run (session 35): a `lowbit compare` run names itself and the
step it saves, and an aborted run's run.json gives its error as text, not ``KeyboardInterrupt()``."""

import json
import os
import signal

import pytest

from lowbit.cli import main
from lowbit.train import trainer as trainer_module

LM = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM += ["--steps", "6", "--eval-interval", "2", "--warmup-steps", "1", "--quiet"]
STUDY = [*LM, "--seeds", "1", "--no-plots", "--threads", "1"]


def _ctrl_c_in(monkeypatch, method: str, at: int, presses: int = 1) -> None:
    """Every Trainer sends this process ``presses`` SIGINTs as its ``method`` starts at step
    ``at`` (``step``: during the step after it; ``evaluate``: the step taken, before its save)."""
    original = getattr(trainer_module.Trainer, method)

    def pressed(self, *args, **kwargs):
        if self.step_idx == at:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, method, pressed)


@pytest.mark.parametrize(("method", "at", "saved"), [("step", 2, 3), ("evaluate", 2, 2)])
def test_a_compare_run_names_itself_and_the_step_it_saves(
    tmp_path, monkeypatch, capsys, method, at, saved
):
    """Its Ctrl-C message was the bare "interrupted: saving a checkpoint after this step", printed
    by every --jobs worker alike: which run stopped, and where, was not said. The step named is
    the one saved, whether the Ctrl-C came during a step or after it (its evaluation)."""
    _ctrl_c_in(monkeypatch, method, at)
    out = tmp_path / "study"
    assert main(["compare", *STUDY, "--recipes", "fp32", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert (
        f"interrupted: study: fp32 seed 0 saves a checkpoint after step {saved} (Ctrl-C again "
        "to abort)"
    ) in err.splitlines(), err
    checkpoints = sorted(p.name for p in (out / "runs/fp32/seed-0/checkpoints").glob("*.pt"))
    assert checkpoints[-1] == f"step-{saved:07d}.pt"


@pytest.mark.parametrize(
    ("presses", "error"),
    [(2, "a second Ctrl-C after step 2"), (0, "KeyboardInterrupt after step 2")],
)
def test_an_aborted_run_says_why_in_run_json(tmp_path, monkeypatch, capsys, presses, error):
    """A second Ctrl-C (or a KeyboardInterrupt raised in the run) left run.json's ``error`` as
    ``KeyboardInterrupt()``: neither what stopped the run nor where."""
    if presses:
        _ctrl_c_in(monkeypatch, "step", 2, presses)
    else:  # a program's own KeyboardInterrupt, as its code raises it in the run

        def raised(self):
            if self.step_idx == 2:
                raise KeyboardInterrupt
            return step(self)

        step = trainer_module.Trainer.step
        monkeypatch.setattr(trainer_module.Trainer, "step", raised)
    run = tmp_path / "run"
    assert main(["train", *LM, "--out", str(run)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lowbit: aborted;")
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert (info["status"], info["step"], info["error"]) == ("aborted", 2, error)
