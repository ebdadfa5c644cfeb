"""Session 25's hunt through `lowbit compare`'s report (report.md, report.html, results.json) as a
demanding user reads it: the train gap's seed spread, and evaluations whose validation loss was
not finite."""

import json
import shutil
import statistics

import pytest

from lowbit.cli import main
from lowbit.report import compare, make_study
from tests.once import folder_once_per_session
from tests.report.conftest import quiet, study_on_one_thread

LM = {"model": "nano", "seq_len": 16, "batch_size": 4, "eval_batches": 1}
LM_STEPS = {"steps": 4, "eval_interval": 2, "warmup_steps": 1}
FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def lm_study(tmp_path_factory):
    """fp32 against bf16-mixed on the tiny causal LM, two seeds (tests copy it before editing),
    compared once per session."""

    def make(folder):
        study_on_one_thread(folder / "lm", "fp32,bf16-mixed", {**LM, **LM_STEPS}, seeds=2)
        return folder / "lm"

    return folder_once_per_session(tmp_path_factory, "hunt-s25", make)


def _loss_row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return line.strip("| ").split(" | ")


def test_train_gap_has_its_paired_seed_spread(lm_study):
    """The val gap read "+0.001% ± 0.005" and the train gap beside it "-0.002%", as if measured
    without a spread: both are paired over the same seeds (docs/parity.md, "Statistics")."""
    report_dir = lm_study / "report"
    results = json.loads((report_dir / "results.json").read_text())
    runs = results["runs"]
    base = [r["train_loss"] for r in runs["fp32"]]
    diffs = [
        100 * (r["train_loss"] - b) / statistics.fmean(base)
        for r, b in zip(runs["bf16-mixed"], base)
    ]
    row = results["recipes"]["bf16-mixed"]
    assert row["train_gap_pct"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert row["train_gap_spread_pct"] == pytest.approx(statistics.stdev(diffs), abs=1e-12)
    shown = f"{row['train_gap_pct']:+.3f}% ± {row['train_gap_spread_pct']:.3f}"
    report = (report_dir / "report.md").read_text()
    assert _loss_row(report, "bf16-mixed")[3] == shown
    assert "paired differences to the baseline's final train and validation losses" in report
    page = (report_dir / "report.html").read_text()
    assert f"<td>{shown}</td>" in page


def test_train_gap_of_one_seed_has_no_spread(tmp_path, capsys):
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", *FLAGS, "--steps", "2"]
    assert main([*argv, "--quiet", "--no-plots", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    row = _loss_row((tmp_path / "one" / "report" / "report.md").read_text(), "bf16-mixed")
    assert row[3].endswith("%") and "±" not in row[3] and "±" not in row[4]


def _nan_at(run_dir, step):
    """The run's validation loss at ``step`` as the trainer logs a NaN one (``"nan"``)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["split"] == "validation" and row["step"] == step:
            row.update(loss="nan", ppl="nan")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_nan_evaluation_shows_in_the_report(lm_study, tmp_path):
    """A seed whose validation loss was NaN at step 2 (and finite at its end): the step vanished
    from its recipe's mean curve (results.json), the gap by evaluation read "—" (not evaluated)
    and the plot had no point there, with nothing in the report saying why."""
    out = tmp_path / "lm"
    shutil.copytree(lm_study, out)
    _nan_at(out / "runs" / "bf16-mixed" / "seed-1", 2)
    result = compare(make_study("fp32,bf16-mixed", {**LM, **LM_STEPS}, seeds=2, out=out), log=quiet)
    assert result.trained == []  # the finished runs are reused, their curves read again
    row = json.loads((result.report_dir / "results.json").read_text())["recipes"]["bf16-mixed"]
    assert row["non_finite_evaluations"] == {"1": [2]}
    assert [step for step, _ in row["curves"]["validation"]] == [0, 2, 4]
    assert dict(row["curves"]["validation"])[2] is None  # JSON's NaN
    assert row["meets_target"]  # its final loss is finite: judged as before
    report = (result.report_dir / "report.md").read_text()
    section = report.split("## Validation gap by evaluation")[1].split("##")[0]
    assert _loss_row(section, "bf16-mixed")[1] == "non-finite"
    assert _loss_row(section, "bf16-mixed")[2].endswith("%")
    why = 'Non-finite validation loss ("non-finite" in the gap by evaluation, x at the top of'
    assert why in report and "bf16-mixed seed 1 at step 2." in report
    page = (result.report_dir / "report.html").read_text()
    assert "<td>non-finite</td>" in page and "bf16-mixed seed 1 at step 2." in page


def test_a_recipe_whose_evaluations_are_all_nan_shows_them(tmp_path, capsys):
    """fp16-mixed at lr 1 skips its overflowing steps and evaluates NaN at every evaluation: its
    gap by evaluation read "—" throughout, as if it had not evaluated."""
    argv = ["compare", "--recipes", "fp32,fp16-mixed", "--seeds", "1", *FLAGS, "--steps", "4"]
    argv += ["--eval-interval", "2", "--lr", "1", "--warmup-steps", "0", "--grad-clip", "1"]
    assert main([*argv, "--quiet", "--out", str(tmp_path / "nan")]) == 0
    capsys.readouterr()
    report = (tmp_path / "nan" / "report" / "report.md").read_text()
    section = report.split("## Validation gap by evaluation")[1].split("##")[0]
    assert _loss_row(section, "fp16-mixed") == ["fp16-mixed", "non-finite", "non-finite"]
    assert "fp16-mixed seed 0 at steps 2, 4." in report
    assert "nan%" not in report.lower()


def test_a_tolerance_no_recipe_is_judged_by_is_warned_about(tmp_path, capsys):
    """With the fp32 baseline every parity recipe is held to its own target: `--tolerance 2` was
    taken without a word and judged nothing (bf16-mixed still "within 0.5%")."""
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", *FLAGS, "--steps", "1"]
    argv += ["--quiet", "--no-plots", "--out", str(tmp_path / "study"), "--tolerance", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "lowbit: warning: --tolerance 2 ignored: every recipe has its own target" in err
    assert "fix: --no-parity-targets" in err
    assert main([*argv, "--no-parity-targets"]) == 0  # the runs are reused
    assert "--tolerance" not in capsys.readouterr().err
    assert main([*argv[:-2], "--target", "bf16-mixed=3"]) == 0  # the default tolerance: no word
    assert "--tolerance" not in capsys.readouterr().err
