"""`lowbit train` options beyond the defaults (tasks, gradient accumulation, epochs): a bug hunt
through the public interfaces (session 26)."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main


def _train_losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("split") == "train"]


def _images(out, *argv) -> int:
    common = ["--task", "image-classification", "--recipe", "fp32", "--grad-clip", "0"]
    return main(["train", *common, "--eval-interval", "100", "--quiet", "--out", out, *argv])


def test_gradient_accumulation_over_epochs_is_the_larger_batch_in_fp32(tmp_path):
    # 1257 digits hold 19 batches of 64, not a whole number of steps of 2: an epoch of the
    # accumulating run was 9 steps of micro-batches 0..17 of the first shuffle, and its step 10
    # took the 19th and the next shuffle's first, where the run with batches of 128 starts a
    # fresh shuffle. Its `--epochs 2` (18 steps, 36 micro-batches) made 1.9 passes, and from step
    # 10 on it trained on other rows than the larger batch.
    accum = ["--batch-size", "64", "--grad-accum", "2", "--epochs", "2"]
    assert _images(str(tmp_path / "accum"), *accum) == 0
    assert _images(str(tmp_path / "large"), "--batch-size", "128", "--epochs", "2") == 0
    accumulated, large = _train_losses(tmp_path / "accum"), _train_losses(tmp_path / "large")
    assert len(accumulated) == len(large) == 18
    assert accumulated == pytest.approx(large, rel=1e-5)


def test_a_step_larger_than_the_training_data_is_refused_in_one_line(tmp_path, capsys):
    # as a batch of 1280 is: a step took rows of two shuffles, and an "epoch" was several passes
    too_many = ["--batch-size", "640", "--grad-accum", "2", "--steps", "1"]
    assert _images(str(tmp_path / "run"), *too_many) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "640 x grad-accum 2 = 1280 examples per optimizer step, more than the 1257" in err
    assert "fix: lower --batch-size or --grad-accum" in err
