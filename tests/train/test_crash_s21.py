"""What a run leaves behind when it is stopped from outside (a scheduler's SIGTERM, SIGKILL), and
how it resumes."""

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

from lowbit.train import checkpoint as ckpt
from lowbit.train import train


class Died(Exception):
    """Stands for SIGTERM's default action (the process dies) without killing the test runner."""


def _die(signum, frame):
    raise Died


def test_sigterm_saves_a_checkpoint_and_stops_as_ctrl_c_does(tiny_config):
    """SIGTERM (how Slurm, Kubernetes and systemd end a job) killed the run where it was: the
    steps since the last checkpoint were lost. Now it finishes the step, saves and stops, and
    the resumed run continues as an uninterrupted one."""

    def terminate(trainer):
        if trainer.step_idx == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config("image-classification", steps=5, eval_interval=2, recipe="fp32")
    previous = signal.signal(signal.SIGTERM, _die)
    try:
        stopped = train(config, quiet=True, on_step=terminate)
        assert signal.getsignal(signal.SIGTERM) is _die  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (stopped.status, stopped.steps) == ("interrupted", 3)
    assert ckpt.latest(config.out).name == "step-0000003.pt"
    resumed = train(config, resume=True, quiet=True)
    straight = train(replace(config, out=config.out + "-straight"), quiet=True)
    assert resumed.steps == 5
    assert _train_losses(config.out) == _train_losses(straight.run_dir)


def _train_losses(run_dir) -> list[tuple[int, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
