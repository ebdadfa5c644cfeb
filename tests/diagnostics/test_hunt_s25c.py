"""Session 25's third hunt through `lowbit doctor` and the `auto` recipe from the command line."""

import json

from lowbit.cli import main

FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def test_doctor_prints_the_auto_plan_of_a_killed_run_up_to_its_checkpoint(tmp_path, capsys):
    """A run killed after its checkpoint of step 2 had logged plan changes at steps 5 and 8,
    which the checkpoint never reached (a resume drops them). `lowbit doctor --checkpoint`
    printed them as the plan of the run it probes from step 2."""
    run = tmp_path / "run"
    argv = ["train", *FLAGS, "--recipe", "auto", "--steps", "2", "--quiet", "--out", str(run)]
    assert main(argv) == 0
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    plan = next(row for row in rows if row["split"] == "auto")
    with metrics.open("a") as file:  # the killed run's later changes: everything to bf16
        for step in (5, 8):
            moved = {**plan, "n_fp8": 0, "n_bf16": plan["n_fp8"], "mean_bits": 16.0}
            file.write(json.dumps({**moved, "step": step}) + "\n")
    capsys.readouterr()
    argv = ["doctor", "--checkpoint", str(run), "--probe-steps", "1", "--out", str(tmp_path / "d")]
    assert main(argv) == 0
    timeline = capsys.readouterr().out.partition("over time:\n")[2].partition("\nwrote")[0]
    steps = [line.split("|")[1].strip() for line in timeline.splitlines()[2:]]
    assert steps == ["1"]


def test_doctor_refuses_a_task_other_than_the_checkpointed_runs(tmp_path, capsys):
    """`lowbit doctor --checkpoint IMAGE_RUN --task causal-lm` failed with "no saved tokenizer;
    fix: restore the run's tokenizer folder", which sent the user after a file that an image run
    never has; the cause is the --task."""
    run = tmp_path / "run"
    argv = ["train", "--task", "image-classification", "--steps", "1", "--batch-size", "8"]
    assert main([*argv, "--eval-batches", "1", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    argv = ["doctor", "--checkpoint", str(run), "--task", "causal-lm", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "a run of image-classification, not causal-lm" in error
    assert "drop --task" in error


def test_doctor_of_an_auto_run_as_auto_fp8_goes_on_with_its_plan(tmp_path, capsys):
    """`auto:fp8` is `auto` (the same preset), yet `lowbit doctor --checkpoint AUTO_RUN --recipe
    auto:fp8` took it for another recipe: the run's plan (every operand on fp8 on this model)
    was dropped and the probe judged the fresh plan's bf16 instead."""
    run = tmp_path / "run"
    argv = ["train", *FLAGS, "--recipe", "auto", "--steps", "1", "--quiet", "--out", str(run)]
    assert main(argv) == 0
    argv = ["doctor", "--checkpoint", str(run), "--recipe", "auto:fp8", "--probe-steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "d" / "doctor.json").read_text())["rows"]
    assert {row["spec"] for row in rows} == {"fp8_e4m3/tensor", "fp8_e5m2/tensor"}
