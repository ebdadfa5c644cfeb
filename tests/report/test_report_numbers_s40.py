"""Session 40's walk through `lowbit compare`'s report, every number recomputed from the runs' own
files (metrics.jsonl, compare.json)."""

import json

import pytest

from lowbit.cli import main

# fp16-mixed at lr 50 overflows at its second step, skips it and ends with a NaN validation loss
NAN = ["--task", "image-classification", "--batch-size", "16", "--steps", "2", "--seeds", "1"]
NAN += ["--lr", "50", "--warmup-steps", "0", "--quiet", "--no-plots", "--threads", "1"]


@pytest.fixture(scope="module")
def nan_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "img"
    assert main(["compare", "--recipes", "fp32,fp16-mixed", *NAN, "--out", str(out)]) == 0
    return out


def _results(out) -> dict:
    return json.loads((out / "report" / "results.json").read_text())


def test_a_diverged_runs_train_loss_is_not_its_steps_before_the_divergence(nan_study):
    """`lowbit train`'s train loss averages the finite losses of the last steps, so a run whose
    loss went NaN kept the ones before: fp16-low at lr 3 (NaN from step 8 of 20) read "train loss
    13.4054, train gap -58.425%" beside an fp32 it failed against, as its validation loss read
    n/a."""
    record = json.loads((nan_study / "runs/fp16-mixed/seed-0/compare.json").read_text())
    assert record["final_metrics"]["loss"] is None and record["train_loss"] is not None
    row = _results(nan_study)["recipes"]["fp16-mixed"]
    assert row["train_loss"] == [None, None] and row["train_gap_pct"] is None
    table = (nan_study / "report" / "report.md").read_text().split("## Loss and task metric")[1]
    assert "| fp16-mixed | n/a | n/a | n/a | n/a |" in table


@pytest.mark.parametrize("status", ["completed", "interrupted"])
def test_a_run_continued_after_the_study_recorded_it_is_refused(tmp_path, capsys, status):
    """`lowbit train --resume --steps N` in a study's run folder lengthened the run, and the study
    reused its old record: the report gave seed 0 at its old step and loss beside a checkpoint
    and a metrics.jsonl that had trained on; so too where that run was stopped on its way (its
    run.json says interrupted at the step it reached: review R7)."""
    out = tmp_path / "img"
    flags = ["--task", "image-classification", "--batch-size", "16", "--steps", "1", "--seeds"]
    flags += ["1", "--eval-batches", "1", "--quiet", "--no-plots", "--threads", "1"]
    study = ["compare", "--recipes", "fp32,bf16-mixed", *flags, "--out", str(out)]
    assert main(study) == 0
    run = out / "runs" / "bf16-mixed" / "seed-0"
    assert main(["train", "--resume", "--steps", "2", "--out", str(run), "--quiet"]) == 0
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": status}))
    report = (out / "report" / "results.json").read_text()
    capsys.readouterr()
    assert main(study) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"lowbit: error: {run}: holds a finished run that trained again after the study "
        f"recorded it (now at step 2, recorded at step 1); fix: remove {run} to train that run "
        "again, or --overwrite to retrain the study"
    ]
    assert (out / "report" / "results.json").read_text() == report
