"""Session 29's hunt through `lowbit compare` as a demanding user reads its report: a per-label
section that said nothing when the baseline (or both sides, on different seeds) stopped on a
non-finite loss, a recipe that never updated its weights judged PASS, and a file where the report
goes found only after every run had trained."""

import json
import shutil

import pytest

from lowbit.cli import main
from lowbit.report import compare, make_study
from lowbit.report.markdown import verdict_lines
from tests.report.conftest import IMAGES, quiet


def _edited(image_study, tmp_path, runs: dict, baseline=None):
    """The study again after the records of ``runs`` ({(recipe, seed): fields}) were updated."""
    out = tmp_path / "img"
    shutil.copytree(image_study, out)
    for (recipe, seed), fields in runs.items():
        path = out / "runs" / recipe / f"seed-{seed}" / "compare.json"
        record = json.loads(path.read_text())
        record.update(fields)
        path.write_text(json.dumps(record))
    study = make_study("fp32,bf16-mixed", IMAGES, seeds=2, out=out, baseline=baseline)
    return compare(study, plots=True, log=quiet)


def _strict(path):
    def refuse(constant):
        raise ValueError(f"{constant} in {path.name}")

    return json.loads(path.read_text(), parse_constant=refuse)


STOPPED = {"final_metrics": {}, "per_label": None, "memory": None, "diverged": "loss is nan"}


@pytest.mark.parametrize(
    ("stopped", "why"),
    [
        # the section was left out of the report without a word
        (
            [("fp32", 0), ("fp32", 1)],
            "the baseline fp32 finished no seed: nothing to compare against",
        ),
        # "no seed finished" for a recipe that finished seed 0
        (
            [("fp32", 0), ("bf16-mixed", 1)],
            "no seed finished by both: the baseline seed 1, this recipe seed 0",
        ),
        ([("bf16-mixed", 0), ("bf16-mixed", 1)], "no seed finished"),
    ],
)
def test_the_per_label_section_says_why_it_compares_nothing(image_study, tmp_path, stopped, why):
    result = _edited(image_study, tmp_path, dict.fromkeys(stopped, STOPPED))
    report = (result.report_dir / "report.md").read_text()
    assert f"| bf16-mixed | every label | — | n/a | n/a ({why}) |" in report
    assert f"n/a ({why})" in (result.report_dir / "report.html").read_text()
    results = _strict(result.report_dir / "results.json")  # no NaN in the JSON
    assert results["recipes"]["bf16-mixed"]["per_label_missing"] == why
    assert results["recipes"]["fp32"]["per_label_missing"] is None
    assert "nan" not in report.lower().replace("non-finite", "")


def test_the_verdicts_name_every_seed_that_diverged(image_study, tmp_path):
    result = _edited(image_study, tmp_path, dict.fromkeys([("fp32", 0), ("fp32", 1)], STOPPED))
    lines = verdict_lines(result.results)
    assert lines[0].startswith("fp32: the baseline diverged (non-finite loss) with seeds 0, 1:")
    assert lines[1] == (
        "bf16-mixed: no verdict: the baseline fp32 diverged (non-finite loss) with seeds 0, 1, so "
        "there is no gap to judge"
    )


def test_a_recipe_that_skipped_every_step_gets_no_verdict(image_study, tmp_path):
    """fp16-mixed at --loss-scale 1e38 skips every step (non-finite gradients) and ends with the
    untrained model's loss; against an fp32 that hardly moved (--lr 1e-6) that read "PASS: within
    0.5% of the baseline", a recipe that never updated its weights."""
    result = _edited(image_study, tmp_path, {("bf16-mixed", 1): {"skipped_steps": 2}})
    row = result.results["recipes"]["bf16-mixed"]
    assert row["meets_target"] is None
    assert row["verdict"] == (
        "no verdict: skipped every step (non-finite gradients) with seed 1, so its weights never "
        "changed and its loss is the untrained model's; fix: a lower --lr"
    )
    assert "| ≤ 0.5% | ❔ |" in (result.report_dir / "report.md").read_text()


def test_a_baseline_that_skipped_every_step_judges_no_recipe(image_study, tmp_path):
    runs = {("bf16-mixed", s): {"skipped_steps": 2} for s in (0, 1)}
    result = _edited(image_study, tmp_path, runs, baseline="bf16-mixed")
    rows = result.results["recipes"]
    assert rows["bf16-mixed"]["meets_target"] is False and rows["fp32"]["meets_target"] is None
    lines = sorted(verdict_lines(result.results))
    assert lines[0] == (
        "bf16-mixed: the baseline skipped every step (non-finite gradients) with seeds 0, 1, so "
        "its weights never changed: no recipe can be judged against it; fix: a lower --lr, or "
        "another --baseline"
    )
    assert lines[1] == (
        "fp32: no verdict: the baseline bf16-mixed skipped every step with seeds 0, 1, so there "
        "is no gap to judge"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # found after every run had trained: "report: File exists; fix: something is in the way"
        (lambda out: (out / "report").touch(), "report is a file where the study writes a folder"),
        (lambda out: (out / "runs").touch(), "runs is a file where the study writes a folder"),
        (
            lambda out: (out / "report" / "results.json").mkdir(parents=True),
            "results.json is a folder where the report writes a file",
        ),
    ],
)
def test_a_path_in_the_way_of_the_report_is_refused_before_training(
    tmp_path, capsys, make, message
):
    out = tmp_path / "study"
    out.mkdir()
    make(out)
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", "--task", "image-classification"]
    argv += ["--steps", "1", "--batch-size", "16", "--eval-batches", "1", "--quiet"]
    assert main([*argv, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "fix: move it away, or choose another --out" in err
    assert len(err.splitlines()) == 1
    assert not (out / "runs" / "fp32").exists()  # nothing trained


def test_the_plots_of_a_long_recipe_list_are_readable(image_study, tmp_path, monkeypatch):
    """The loss curves took matplotlib's ten colours in turn: in a study of every preset the 11th
    recipe drew in the baseline's colour, the 12th in the 2nd's, and so on, and neither the plot
    nor its legend could tell them apart; and the memory bars' legend, placed inside the axes,
    covered the first recipes' bars when every bar reached the top."""
    import matplotlib.figure

    from lowbit.report.plots import write_plots

    styles, covered = [], []

    def record(fig, path, *args, **kwargs):
        if path.name == "loss_curves.png":
            lines = [line for line in fig.axes[0].get_lines() if line.get_label()[0] != "_"]
            styles.extend((line.get_color(), line.get_linestyle()) for line in lines)
        if path.name == "speed_memory.png":  # the legend of the memory bars, drawn over them
            fig.canvas.draw()
            memory = fig.axes[1]
            legend = memory.get_legend().get_window_extent()
            bars = [bar.get_window_extent() for bar in memory.patches if bar.get_height() > 0]
            covered.extend(bar for bar in bars if bar.overlaps(legend))

    results = _edited(image_study, tmp_path, {}).results
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    row = results["recipes"]["bf16-mixed"]
    results["recipes"].update({f"recipe-{i}": row for i in range(12)})
    write_plots(results, tmp_path)
    assert len(styles) == 14 and len(set(styles)) == 14
    assert not covered


def test_the_gap_by_evaluation_of_a_long_run_fits_a_page(image_study, tmp_path):
    """A run evaluated 50 times (5000 steps at the default --eval-interval 100) made the table
    of gaps by evaluation 51 columns wide; it shows 12, evenly spaced, the last (the loss table's
    gap) among them, and says so."""
    from lowbit.report.markdown import tables

    results = _edited(image_study, tmp_path, {}).results
    for name, row in results["recipes"].items():
        loss = 2.0 if name == "fp32" else 2.02
        row["curves"]["validation"] = [[100 * i, loss] for i in range(51)]
    title, header, rows = next(t for t in tables(results) if t[0].startswith("Validation gap"))
    assert header[1:] == [f"step {100 * round(i * 49 / 11) + 100}" for i in range(12)]
    assert header[1] == "step 100" and header[-1] == "step 5000"
    assert rows == [["bf16-mixed"] + ["+1.000%"] * 12]
    assert "12 of the 50 evaluations, evenly spaced (results.json holds every one)" in title


def test_auto_spelt_with_its_default_budget_is_auto():
    """``auto:fp8`` names the recipe ``auto`` (its default budget), as `lowbit train` reads it;
    --recipes refused it as unknown. Listed beside ``auto`` it is the same recipe twice."""
    from lowbit.errors import UsageError
    from lowbit.report.compare import parse_recipes

    assert parse_recipes("fp32,auto:fp8") == ["fp32", "auto"]
    with pytest.raises(UsageError, match="'auto' is listed twice"):
        parse_recipes("auto,auto:fp8")
