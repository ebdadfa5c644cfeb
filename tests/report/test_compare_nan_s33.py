"""Session 33's hunt through `lowbit compare` for NaN and inf in the report: a recipe that trains to
the end with NaN validation outputs (fp16-mixed at a huge --lr skips its overflowing steps) had
per-label counts taken from the argmax of NaN rows, the first label every time."""

import json
import shutil

import pytest

from lowbit.cli import main

# fp16-mixed at lr 50 overflows, skips that step and evaluates NaN: it finishes, it does not stop
FLAGS = ["--task", "image-classification", "--batch-size", "16", "--steps", "2", "--seeds", "1"]
FLAGS += ["--lr", "50", "--warmup-steps", "0", "--quiet", "--no-plots", "--threads", "1"]


@pytest.fixture(scope="module")
def nan_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "img"
    assert main(["compare", "--recipes", "fp32,fp16-mixed", *FLAGS, "--out", str(out)]) == 0
    return out


def _forgets_rows(out) -> list[str]:
    report = (out / "report" / "report.md").read_text()
    section = report.split("## What the model forgets")[1]
    return [line for line in section.splitlines() if "|" in line][2:]


def test_nan_outputs_are_not_read_as_what_the_recipe_forgets(nan_study):
    """Every NaN row predicted label 0: label 0 at 100% and every other at 0% read as a recipe
    that forgot nine digits."""
    record = json.loads((nan_study / "runs/fp16-mixed/seed-0/compare.json").read_text())
    assert record["per_label"] is None and record["non_finite_outputs"] is True
    why = "no prediction: its validation outputs were NaN or inf with seed 0"
    assert _forgets_rows(nan_study) == [f"| fp16-mixed | every label | — | n/a | n/a ({why}) |"]
    assert f"n/a ({why})" in (nan_study / "report" / "report.html").read_text()
    results = json.loads((nan_study / "report" / "results.json").read_text())
    assert results["recipes"]["fp16-mixed"]["per_label_missing"] == why
    assert all(c["recipe"] is None for c in results["recipes"]["fp16-mixed"]["per_label"].values())


def test_a_baseline_with_nan_outputs_is_not_compared_per_label(nan_study):
    """The same runs against the fp16-mixed baseline: fp32 read as forgetting label 0 (100% ->
    0%), the baseline's NaN argmax."""
    argv = ["compare", "--recipes", "fp32,fp16-mixed", "--baseline", "fp16-mixed", *FLAGS]
    assert main([*argv, "--out", str(nan_study)]) == 0  # reuses the runs
    why = "the baseline fp16-mixed predicted nothing: its validation outputs were NaN or inf with "
    assert _forgets_rows(nan_study) == [f"| fp32 | every label | — | n/a | n/a ({why}seed 0) |"]


def test_a_record_from_before_counts_nothing_for_nan_outputs(nan_study):
    """A record written before session 33 kept the NaN argmax's counts (label 0 all correct) and
    no flag: its non-finite validation loss tells them apart."""
    path = nan_study / "runs/fp16-mixed/seed-0/compare.json"
    saved = path.read_text()
    record = json.loads(saved)
    del record["non_finite_outputs"]
    record["per_label"] = {
        str(label): {"correct": 27 if label == 0 else 0, "total": 27} for label in range(10)
    }
    try:
        path.write_text(json.dumps(record))
        argv = ["compare", "--recipes", "fp32,fp16-mixed", *FLAGS, "--out", str(nan_study)]
        assert main(argv) == 0
        rows = _forgets_rows(nan_study)
    finally:
        path.write_text(saved)
    why = "no prediction: its validation outputs were NaN or inf with seed 0"
    assert rows == [f"| fp16-mixed | every label | — | n/a | n/a ({why}) |"]


def test_a_finished_run_without_its_metrics_file_is_refused_before_training(
    nan_study, tmp_path, capsys
):
    """A reused run folder without metrics.jsonl (deleted, or left out of a copy) stopped the
    study with a FileNotFoundError traceback once every run had trained, when the report read its
    curves."""
    out = tmp_path / "img"
    shutil.copytree(nan_study, out)
    (out / "runs/fp32/seed-0/metrics.jsonl").unlink()
    report = (out / "report" / "report.md").read_text()
    capsys.readouterr()
    assert main(["compare", "--recipes", "fp32,fp16-mixed", *FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowbit: error: {out}/runs/fp32/seed-0: holds a finished run without its metrics.jsonl, "
        f"the loss curves the report reads; fix: restore the file, or remove {out}/runs/fp32/"
        "seed-0 to train that run again"
    )
    assert (out / "report" / "report.md").read_text() == report


def test_a_misspelt_recipe_in_recipes_gets_the_name_it_misspells(capsys):
    """`lowbit train --recipe bf16_mixed` named 'bf16-mixed'; compare listed all 22 names."""
    assert main(["compare", "--recipes", "fp32,bf16_mixed", "--steps", "1"]) == 2
    assert "fix: did you mean 'bf16-mixed'?" in capsys.readouterr().err
