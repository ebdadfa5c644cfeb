"""Session 30: run.json's step follows the checkpoints while the run trains, and the summary's
memory figures are labelled in the units they are computed in."""

from __future__ import annotations

import json

from lowbit.train import TrainConfig, train

TINY = {"model": "nano", "seq_len": 16, "batch_size": 2, "eval_batches": 1, "eval_interval": 100}


def test_run_json_holds_the_step_of_the_last_checkpoint_while_the_run_trains(tmp_path):
    """A run killed after its last checkpoint (in the final evaluation or sample) read as
    "running" at step 0, though README says run.json holds the last step."""
    out = tmp_path / "run"
    seen = {}

    def on_step(trainer):
        seen[trainer.step_idx] = json.loads((out / "run.json").read_text())

    config = TrainConfig(steps=4, save_interval=2, out=str(out), **TINY)
    result = train(config, quiet=True, on_step=on_step)
    assert [(seen[s]["status"], seen[s]["step"]) for s in (1, 2, 3)] == [
        ("running", 0),
        ("running", 2),
        ("running", 2),
    ]
    assert "MiB RSS" in result.summary() and " MB" not in result.summary()
