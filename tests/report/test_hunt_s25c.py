"""Session 25's third hunt through `lowbit compare` from the command line: the thread counts a
study's runs trained on, and its flags in combination."""

import json

from lowbit.cli import main

LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM_FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1"]


def _compare(out, *flags) -> int:
    return main(["compare", *LM_FLAGS, "--quiet", "--no-plots", "--out", str(out), *flags])


def test_a_recipe_added_on_other_threads_is_said_to_mix_thread_counts(tmp_path, capsys):
    """fp32 trained on --threads 2, bf16-mixed added later on --threads 1 (fp32's run reused):
    the speed table compared throughputs measured on 2 and 1 threads with no word."""
    out = tmp_path / "study"
    assert _compare(out, "--recipes", "fp32", "--threads", "2") == 0
    assert "thread counts" not in capsys.readouterr().out  # one run: nothing to warn about
    assert _compare(out, "--recipes", "fp32,bf16-mixed", "--threads", "1") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "report" / "results.json").read_text())
    assert [r["threads"] for r in results["runs"]["fp32"]] == [[2]]
    assert [r["threads"] for r in results["runs"]["bf16-mixed"]] == [[1]]
    assert results["speed_threads"] == [1, 2]
    warning = "the runs trained on different thread counts (--threads 1, 2)"
    assert warning in (out / "report" / "report.md").read_text() and warning in printed


def test_a_recipe_given_two_targets_is_refused(tmp_path, capsys):
    """``--target bf16-mixed=3 --target bf16-mixed=0.1``: the last silently won, and the study
    trained and judged bf16-mixed by 0.1% alone."""
    out = tmp_path / "study"
    flags = ["--recipes", "fp32,bf16-mixed", "--target", "bf16-mixed=3", "--target"]
    assert _compare(out, *flags, "bf16-mixed=0.1") == 2
    error = capsys.readouterr().err
    assert "--target bf16-mixed is given twice; fix: give each recipe one --target" in error
    assert not out.exists()  # refused before anything is trained


def test_fewer_runs_than_jobs_share_the_cores_among_themselves(tmp_path):
    """One run under --jobs 2 trained on half the cores, the other half idle, and was recorded
    as measured beside a second run that never existed (session 27). (The digits CNN: the cores
    a worker is given are the same for every task, and its worker starts without importing
    transformers, seconds of CPU.)"""
    import os

    out = tmp_path / "study"
    digits = ["--task", "image-classification", "--batch-size", "4", "--steps", "2", "--seeds", "1"]
    argv = ["compare", *digits, "--quiet", "--no-plots", "--out", str(out)]
    assert main([*argv, "--recipes", "fp32", "--jobs", "2"]) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    (run,) = results["runs"]["fp32"]
    assert run["threads"] == [os.cpu_count()] and run["jobs"] == 1
