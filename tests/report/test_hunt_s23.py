"""Session 23's hunt through `lowbit compare` and `lowbit doctor` as a demanding user runs them:
quantized optimizer states in a pure-bf16 probe, a probe of a checkpoint with another model, an
interrupted --overwrite study, and a corrected command after a study that trained nothing."""

import pytest

from lowbit.cli import main
from lowbit.diagnostics.doctor import diagnose
from lowbit.train import TrainConfig
from lowbit.train.config import resolve

TINY = {"model": "nano", "seq_len": 16, "batch_size": 4, "eval_batches": 1, "device": "cpu"}
FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


@pytest.mark.parametrize("state", ["fp8", "8bit", "4bit"])
def test_doctor_of_pure_bf16_reads_quantized_optimizer_states(state, tmp_path):
    """The rounded-away check reads Adam's moments: torchao's quantized states have no arithmetic
    of their own, and the probe of `bf16-pure --optimizer-state 8bit` (which train runs) crashed
    with a NotImplementedError traceback."""
    config = TrainConfig(
        **TINY, recipe="bf16-pure", optimizer_state=state, lr=1e-5, out=str(tmp_path / "probe")
    )
    flags = diagnose(resolve(config), steps=1).flags
    assert "bf16-updates-rounded-away" in {flag["pattern"] for flag in flags}


def test_doctor_of_a_checkpoint_with_another_model_is_a_one_line_error(tmp_path, capsys):
    """The probe loads the run's weights into the model its settings build: `--model tiny` on a
    nano run's checkpoint raised PyTorch's size-mismatch traceback."""
    run = tmp_path / "run"
    assert main(["train", *FLAGS, "--steps", "1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    argv = ["doctor", "--checkpoint", str(run), "--model", "tiny", "--probe-steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "doc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model 'tiny', the run trained 'nano'" in err and "fix: drop --model" in err


def _interrupt_when(path, text):
    """A thread that sends this process a SIGINT (a Ctrl-C) once ``path`` holds ``text``."""
    import os
    import signal
    import threading
    import time

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:  # --overwrite clears the run folder: the file may go between a look and a read
                held = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                held = ""
            if text in held:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_interrupted_overwrite_resumes_without_it_and_retrains_every_run(tmp_path, capsys):
    """`compare --overwrite` (new settings) stopped in its first run said "run the same command
    again": with --overwrite that retrains from scratch, and without it the second run's old
    record was refused as other settings, fix --overwrite. Every run is cleared first now, so the
    command without --overwrite resumes the first run and trains the second anew."""
    import json

    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32", "--seeds", "2", *FLAGS, "--steps", "20"]
    argv += ["--eval-interval", "20", "--no-plots", "--quiet", "--out", str(out)]
    assert main([*argv, "--lr", "0.001"]) == 0
    watcher = _interrupt_when(out / "runs" / "fp32" / "seed-0" / "config.yaml", "lr: 0.002")
    assert main([*argv, "--lr", "0.002", "--overwrite"]) == 130
    watcher.join()
    assert "run the same command again without --overwrite to resume" in capsys.readouterr().err
    assert main([*argv, "--lr", "0.002"]) == 0
    assert "(reused)" not in capsys.readouterr().out
    for seed in range(2):
        record = json.loads((out / "runs" / "fp32" / f"seed-{seed}" / "compare.json").read_text())
        assert record["config"]["lr"] == 0.002


def test_a_corrected_command_takes_over_the_folder_of_a_study_that_trained_nothing(
    tmp_path, capsys
):
    """A --data typo fails in the first run's set-up, after the study wrote its settings: the
    corrected command was refused as "a compare study with other settings", though the folder
    held no run; one that holds a run is still refused."""
    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", *FLAGS, "--steps", "1"]
    argv += ["--no-plots", "--quiet", "--out", str(out)]
    assert main([*argv, "--data", str(tmp_path / "typo")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(argv) == 0
    assert main([*argv, "--lr", "0.002"]) == 2
    assert "holds a compare study with other settings (lr" in capsys.readouterr().err


def test_a_config_file_naming_one_runs_recipe_seed_or_folder_is_warned_about(tmp_path, capsys):
    """A `lowbit train` config file given to compare: its seed, recipe and out were dropped
    without a word (`seed: 5` trained seed 0)."""
    config = tmp_path / "run.yaml"
    config.write_text("recipe: bf16-mixed\nseed: 5\nsteps: 1\n")
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", *FLAGS, "--config", str(config)]
    assert main([*argv, "--no-plots", "--quiet", "--out", str(tmp_path / "study")]) == 0
    err = capsys.readouterr().err
    assert f"lowbit: warning: {config}: recipe, seed ignored" in err and "--first-seed" in err
    assert (tmp_path / "study" / "runs" / "fp32" / "seed-0" / "compare.json").is_file()


def test_fp32_runs_are_reused_by_a_study_that_adds_fp16_at_another_loss_scale(tmp_path, capsys):
    """--loss-scale reaches only the fp16 recipes' runs (fp32's records hold no loss scale), but
    the folder's check compared it as every run's setting and refused the study."""
    out = tmp_path / "study"
    argv = ["compare", "--seeds", "1", *FLAGS, "--steps", "1", "--no-plots", "--out", str(out)]
    assert main([*argv, "--recipes", "fp32"]) == 0
    capsys.readouterr()
    assert main([*argv, "--recipes", "fp32,fp16-mixed", "--loss-scale", "1024"]) == 0
    log = capsys.readouterr().out
    assert "fp32 seed 0: validation loss" in log and "(reused)" in log.split("fp16-mixed")[0]
