"""Session 26's hunt through `lowbit doctor`, the `auto` recipe and their options."""

import json

from lowbit.cli import main

FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def test_doctor_says_it_probes_a_multi_process_run_in_one_process(tmp_path, capsys):
    """`lowbit doctor --nproc 2 --strategy fsdp` (the train flags it takes) probed in one process
    without a word, as if the flags had been obeyed."""
    argv = ["doctor", *FLAGS, "--recipe", "fp8-tensorwise", "--nproc", "2", "--strategy", "fsdp"]
    assert main([*argv, "--probe-steps", "1", "--out", str(tmp_path / "d")]) == 0
    error = capsys.readouterr().err
    assert "the probe runs in one process, not --nproc 2 --strategy fsdp" in error
    assert "global batch of 4" in error
    assert json.loads((tmp_path / "d" / "doctor.json").read_text())["probe_steps"] == 1


def test_doctor_names_the_train_options_it_ignores(tmp_path, capsys):
    """A copied `lowbit train` command line's --save-interval, --keep-last, --eval-interval and
    --wandb were accepted and ignored without a word (the probe saves, validates and logs
    nothing)."""
    argv = ["doctor", *FLAGS, "--recipe", "fp8-tensorwise", "--probe-steps", "1"]
    argv += ["--save-interval", "3", "--keep-last", "1", "--eval-interval", "5", "--wandb"]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 0
    error = capsys.readouterr().err
    note = next(line for line in error.splitlines() if "ignored" in line)
    for flag in ("--save-interval", "--keep-last", "--eval-interval", "--eval-batches", "--wandb"):
        assert flag in note
