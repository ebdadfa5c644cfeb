"""Session 26's hunt through multi-process training (DDP, FSDP2) and `lowbit.distributed.Ranks`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train

NANO = {"model": "nano", "seq_len": 16, "batch_size": 4, "eval_batches": 1, "eval_interval": 100}


@pytest.mark.parametrize("value", ["10m", "0", "-5", "inf"])
def test_a_lowbit_dist_timeout_that_is_not_seconds_is_a_one_line_error(
    value, tmp_path, monkeypatch
):
    """LOWBIT_DIST_TIMEOUT=10m failed every rank with float's "could not convert string to float:
    '10m'" (a traceback naming neither the variable nor its unit); 0 or a negative value with
    "The client socket has timed out after 0ms" at the rendezvous; inf with an OverflowError."""
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", value)
    config = TrainConfig(strategy="ddp", steps=1, out=str(tmp_path / "run"), **NANO)
    with pytest.raises(UsageError, match=rf"LOWBIT_DIST_TIMEOUT={value} is not a positive"):
        train(config, quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-mixed", "fp8-delayed"])
def test_a_multi_process_run_resumes_where_the_precision_refuses_an_optimizers_own_step(
    recipe, tmp_path
):
    """A DCP checkpoint is loaded into optimizer states that DCP creates by a step of the
    optimizer itself (zero gradients, learning rate 0). The precision refuses a wrapped optimizer's
    own step under loss scaling, 16-bit parameters and delayed scaling: every resume of those
    recipes under --strategy stopped with "AdamW.step() ... outside precision.step()"."""
    out = str(tmp_path / "run")
    train(TrainConfig(recipe=recipe, strategy="fsdp", steps=1, out=out, **NANO), quiet=True)
    config = TrainConfig(recipe=recipe, strategy="fsdp", steps=2, out=out, **NANO)
    assert train(config, resume=True, quiet=True).steps == 2


def _train_losses(out) -> list[float]:
    with open(Path(out) / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if r.get("split") == "train"]


def test_a_checkpoint_saved_before_any_step_was_taken_resumes_as_one_process(tmp_path):
    """fp16-mixed at a loss scale of 2^20 overflows at step 1 (skipped) and steps from step 2.
    Saving step 1 stopped the run with "AdamW.step() ... outside precision.step()": DCP creates
    missing optimizer states by a step of the optimizer itself. Created and kept, they also
    counted a step that one process never took (AdamW's bias correction of every later step)."""
    settings = dict(recipe="fp16-mixed", loss_scale=2.0**20, **NANO)
    alone = train(TrainConfig(steps=3, out=str(tmp_path / "alone"), **settings), quiet=True)
    assert alone.skipped_steps == 1
    out = str(tmp_path / "ranks")
    saved = train(TrainConfig(strategy="ddp", steps=1, out=out, **settings), quiet=True)
    assert saved.skipped_steps == 1 and saved.checkpoint is not None
    train(TrainConfig(strategy="ddp", steps=3, out=out, **settings), resume=True, quiet=True)
    assert _train_losses(out) == _train_losses(alone.run_dir)
