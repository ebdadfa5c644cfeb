"""`lowbit compare` and `benchmarks/parity.py` as a demanding user runs them: runs that end with no
finite loss (in a recipe or in the baseline), a study of the baseline alone on a labelled task,
and settings that must be one-line errors before anything is trained."""

import json
import math
import shutil

import pytest

from lowbit.cli import main
from lowbit.report import compare, make_study
from lowbit.report.markdown import verdict_lines
from tests.once import folder_once_per_session
from tests.report.conftest import study_on_one_thread

SETTINGS = {
    "task": "causal-lm",
    "model": "nano",
    "seq_len": 16,
    "batch_size": 4,
    "steps": 4,
    "eval_interval": 2,
    "eval_batches": 1,
    "warmup_steps": 1,
}


def quiet(line):
    pass


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """fp32 against bf16-mixed, two seeds, every run finished (tests copy it before editing),
    compared once per session."""

    def make(folder):
        return study_on_one_thread(
            folder / "s", "fp32,bf16-mixed", SETTINGS, 2, plots=False
        ).study.out

    return folder_once_per_session(tmp_path_factory, "user-studies", make)


def _copy_with_non_finite_loss(finished_study, tmp_path, recipe, seed):
    """The study with one run's record as a run ends whose validation loss is not finite: a
    recipe that skips non-finite steps (fp16's loss scaling) trains on to the end, and its record
    stores the NaN as JSON null."""
    out = tmp_path / "study"
    shutil.copytree(finished_study, out)
    path = out / "runs" / recipe / f"seed-{seed}" / "compare.json"
    record = json.loads(path.read_text())
    record["final_metrics"] = {"loss": None, "ppl": None, "tokens": 64}
    path.write_text(json.dumps(record))
    return make_study("fp32,bf16-mixed", SETTINGS, seeds=2, out=out)


def test_a_seed_without_a_finite_loss_fails_the_recipe_instead_of_being_left_out(
    finished_study, tmp_path
):
    """The gap was the other seed's alone, with a spread of 0 that called it significant, and the
    reused record's null loss stopped the progress line with a TypeError."""
    lines = []
    result = compare(
        _copy_with_non_finite_loss(finished_study, tmp_path, "bf16-mixed", 1),
        plots=False,
        log=lines.append,
    )
    assert "bf16-mixed seed 1: validation loss nan (reused)" in lines[-1]
    row = result.results["recipes"]["bf16-mixed"]
    assert row["verdict"] == "FAIL: diverged (non-finite loss) with seed 1"
    assert row["meets_target"] is False and row["diverged"] == [1]
    assert math.isnan(row["val_gap_pct"]) and math.isnan(row["val_loss"][0])
    report = (result.report_dir / "report.md").read_text()
    assert "| bf16-mixed | " in report and "| n/a | n/a |" in report  # no one-seed mean, no gap


def test_a_diverged_baseline_judges_no_recipe_and_says_why(finished_study, tmp_path):
    result = compare(
        _copy_with_non_finite_loss(finished_study, tmp_path, "fp32", 0), plots=False, log=quiet
    )
    base, other = result.results["recipes"]["fp32"], result.results["recipes"]["bf16-mixed"]
    assert base["meets_target"] is False and "the baseline diverged" in base["verdict"]
    assert other["meets_target"] is None
    assert other["verdict"].startswith("no verdict: the baseline fp32 diverged")
    lines = verdict_lines(result.results)
    assert lines[0].startswith("fp32: the baseline diverged") and len(lines) == 2
    html = (result.report_dir / "report.html").read_text()
    assert "<li class='fail'>fp32: the baseline diverged" in html


def test_a_study_of_the_baseline_alone_on_a_labelled_task_writes_its_plots(tmp_path, capsys):
    """The per-label heat map has a row per recipe besides the baseline: with none, matplotlib
    was asked for an empty image and the study ended in a traceback after training."""
    argv = ["compare", "--recipes", "fp32", "--task", "image-classification", "--seeds", "1"]
    argv += ["--steps", "2", "--batch-size", "16", "--eval-batches", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    report = tmp_path / "c" / "report"
    assert "only the baseline (fp32) ran" in (report / "report.md").read_text()
    assert (report / "loss_curves.png").is_file() and not (report / "per_label.png").exists()


def test_a_recipe_whose_every_seed_diverged_reads_n_a_in_the_per_label_table(tmp_path):
    """A run stopped by a non-finite loss has no per-label counts; the table printed "nan%" and
    "+nan pp" for such a recipe's labels."""
    settings = {"task": "image-classification", "batch_size": 16, "steps": 2, "eval_batches": 1}
    out = tmp_path / "img"
    compare(make_study("fp32,bf16-pure", settings, seeds=1, out=out), plots=False, log=quiet)
    path = out / "runs" / "bf16-pure" / "seed-0" / "compare.json"
    record = json.loads(path.read_text())
    record.update(final_metrics={}, per_label=None, diverged="non-finite loss at step 2")
    path.write_text(json.dumps(record))
    result = compare(make_study("fp32,bf16-pure", settings, seeds=1, out=out), log=quiet)
    report = (result.report_dir / "report.md").read_text()
    assert "nan" not in report
    assert "| bf16-pure | every label | — | n/a | n/a (no seed finished) |" in report
    assert (result.report_dir / "per_label.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "{tmp}/file"], "is a file, not a folder"),
        (["--out", "{tmp}/file/study"], "file is a file, not a folder"),
        (["--out", "{tmp}/file", "--overwrite"], "is a file, not a folder"),
        (["--first-seed", "-1"], "seeds must be non-negative, got -1"),
        (["--first-seed", str(2**32 - 1), "--seeds", "2"], "must be below 2**32, got 4294967296"),
        (["--target", "bf16-mixed=-1"], "a tolerance is a non-negative percent"),
    ],
)
def test_settings_no_study_can_use_are_one_line_errors(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("mine\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "c")]
    base = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", "--steps", "1"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: ") and message in err and "\n" not in err
    assert (tmp_path / "file").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing trained or written


def test_a_config_file_asking_for_several_processes_is_refused(tmp_path, capsys):
    """The file's nproc/strategy went into every run's config.yaml while the run trained in one
    process (compare sets the flags itself and has no such flags)."""
    config = tmp_path / "run.yaml"
    config.write_text("nproc: 2\nstrategy: ddp\nsteps: 1\n")
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "a compare study trains every run in one process" in err
    assert not (tmp_path / "c").exists()


def test_plots_of_an_earlier_invocation_do_not_outlive_it(finished_study, tmp_path):
    """A rerun with --no-plots left the earlier PNGs beside a report that no longer shows them."""
    out = tmp_path / "study"
    shutil.copytree(finished_study, out)
    study = make_study("fp32,bf16-mixed", SETTINGS, seeds=2, out=out)
    drawn = compare(study, log=quiet).report_dir
    assert (drawn / "loss_curves.png").is_file()
    compare(study, plots=False, log=quiet)
    assert not list(drawn.glob("*.png"))
    assert "![" not in (drawn / "report.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--recipes", "fp32,fp32"], "recipe 'fp32' is listed twice"),
        (["--img-steps", "0"], "--img-steps must be at least 1, got 0"),
    ],
)
def test_parity_settings_are_one_line_errors_before_anything_runs(
    parity, argv, message, tmp_path, capsys
):
    argv = ["--tasks", "image-classification", *argv, "--no-write", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        parity.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_parity_refuses_a_foreign_out_folder_before_training_into_it(parity, tmp_path, capsys):
    """`compare` checks its folder only after parity.py's workers have trained every run into it."""
    (tmp_path / "image-classification").mkdir()
    (tmp_path / "image-classification" / "notes.txt").write_text("mine\n")
    argv = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
    with pytest.raises(SystemExit) as stopped:
        parity.main([*argv, "--img-steps", "1", "--no-write", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "holds 'notes.txt', not a compare study" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "image-classification").iterdir()] == ["notes.txt"]


def test_auto_budgets_are_recipes_a_study_takes():
    """auto:fp6 and auto:fp4 train and estimate, and compare refused them as unknown."""
    from lowbit.errors import UsageError
    from lowbit.report.compare import parse_recipes

    assert parse_recipes("fp32,auto:fp4,auto:fp6") == ["fp32", "auto:fp4", "auto:fp6"]
    with pytest.raises(UsageError, match=r"unknown recipe 'auto:fp3'.*auto:fp6, auto:fp4"):
        parse_recipes("fp32,auto:fp3")


def test_a_study_killed_while_writing_its_settings_runs_again(tmp_path):
    """A kill while compare.json was first written left only its temporary file, and the same
    command was refused ("folder holds '.compare.json.17233.tmp', not a compare study")."""
    from lowbit.errors import UsageError
    from lowbit.report.compare import check_out

    out = tmp_path / "study"
    out.mkdir()
    (out / ".compare.json.17233.tmp").write_text("{")
    check_out(make_study("fp32,bf16-mixed", SETTINGS, seeds=1, out=out), overwrite=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"folder holds 'notes\.txt', not a compare study"):
        check_out(make_study("fp32,bf16-mixed", SETTINGS, seeds=1, out=out), overwrite=False)
