"""Session 34: a run's outputs and settings (learning-rate schedule, metrics, config files)."""

import json

from lowbit.cli import main

DIGITS = ["train", "--task", "image-classification", "--batch-size", "32", "--quiet"]


def test_a_given_warmup_as_long_as_an_epochs_run_is_warned_of(tmp_path, capsys):
    """``--epochs 0.2 --warmup-steps 100`` (a run of 8 steps) trained at a fraction of --lr,
    rising, and never decayed, without a word: the warning of a warmup as long as the run was
    given for --steps only, whose steps are known before the data is read. The task's default
    warmup is its default length's: no warning, as for --steps."""
    out = tmp_path / "run"
    assert main([*DIGITS, "--epochs", "0.2", "--warmup-steps", "100", "--out", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warmup" in line]
    steps = json.loads((out / "run.json").read_text(encoding="utf-8"))["total_steps"]
    assert len(warned) == 1 and f"is not below the run's {steps} steps" in warned[0], warned
    assert warned[0].endswith(f"fix: --warmup-steps below {steps}, or more --epochs")
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "lr" in r]
    assert len(lrs) == steps and max(lrs) < 3e-3 * steps / 100 + 1e-12  # never near --lr
    assert main([*DIGITS, "--epochs", "0.2", "--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr()
    assert "warmup" not in printed.err
    assert "(at step" not in printed.out  # a completed run's last validation is at its end


def test_an_interrupted_runs_summary_says_the_step_of_its_last_validation(tiny_config):
    """Stopped at step 4, the summary read "4 steps (interrupted)" and "validation loss 5.51 ->
    4.29" without a word that 4.29 was measured at step 3: it read as the checkpoint's loss."""
    from lowbit.train import train

    def stop(trainer):
        trainer.stop_requested = trainer.step_idx == 4

    config = tiny_config(model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=7)
    config.eval_interval, config.warmup_steps = 3, 0
    result = train(config, quiet=True, on_step=stop)
    assert (result.status, result.steps) == ("interrupted", 4)
    line = next(line for line in result.summary().splitlines() if "validation loss" in line)
    records = map(json.loads, (result.run_dir / "metrics.jsonl").open())
    at_3 = next(r for r in records if (r["step"], r["split"]) == (3, "validation"))
    assert f"-> {at_3['loss']:.4f}" in line and line.endswith("(at step 3)"), line
