"""Session 35 polish of `lowbit compare`: an empty --recipes entry, a --model the task cannot
build (refused before the study writes anything), a seed spread the report printed as zero, and
a "what the model forgets" heading that named labels no recipe dropped."""

import copy
import html
import shutil

import pytest

from lowbit.cli import main
from lowbit.report import compare, make_study
from lowbit.report.compare import Target, verdict
from lowbit.report.html import write_html
from lowbit.report.markdown import write_markdown
from tests.report.conftest import IMAGES, quiet
from tests.report.test_hunt_s25 import _loss_row

SMALL = ["--seeds", "1", "--steps", "1", "--no-plots", "--quiet"]


@pytest.mark.parametrize(
    ("recipes", "position"), [("fp32,,bf16-mixed", 2), (",fp32", 1), ("fp32,bf16-mixed,", 3)]
)
def test_an_empty_recipes_entry_is_refused_naming_its_position(tmp_path, capsys, recipes, position):
    """`--recipes fp32,,bf16-mixed` compared fp32 and bf16-mixed as if the entry were not there:
    a recipe left out by mistake went unnoticed."""
    out = tmp_path / "study"
    assert main(["compare", "--recipes", recipes, *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowbit: error: --recipes entry {position} is empty ({recipes!r}); fix: name a recipe "
        "there or drop the extra comma"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("task", "model", "said"),
    [
        ("image-classification", "nano", "unknown CNN size 'nano'; valid CNN sizes: tiny, small; "
         "fix: --model tiny or small for image-classification"),
        ("causal-lm", "no-such-model", "no-such-model: not a Hugging Face checkpoint folder"),
        ("token-classification", "nano", "nano: neither a token-classifier size (tiny, small)"),
    ],
)  # fmt: skip
def test_a_model_the_task_cannot_build_is_refused_before_the_study_writes(
    tmp_path, monkeypatch, capsys, task, model, said
):
    """`--model nano --task image-classification` failed in the first run's set-up, after the
    study had written its compare.json, with no fix in the message."""
    monkeypatch.chdir(tmp_path)  # a relative --model path resolves here: nothing is at it
    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--task", task, "--model", model]
    assert main([*argv, *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert said in err and "fix: " in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def image_results(image_study, tmp_path_factory):
    """conftest's two-seed image study, reused (nothing trained) in a copy: its results."""
    out = tmp_path_factory.mktemp("polish") / "img"
    shutil.copytree(image_study, out)
    return compare(make_study("fp32,bf16-mixed", IMAGES, seeds=2, out=out), log=quiet, plots=False)


def _written(results, tmp_path) -> tuple[str, str]:
    write_markdown(results, tmp_path / "report.md")
    write_html(results, tmp_path / "report.html", {})
    return (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("spread", [0.0004, 0.00002])
def test_a_nonzero_seed_spread_is_never_printed_as_zero(image_results, tmp_path, spread):
    """The val gap read "+0.003% ± 0.000" while the verdict said "2x seed spread 0.001%,
    difference significant": the table printed the spread at 3 decimals whatever it was. So
    did the train gap's."""
    results = copy.deepcopy(image_results.results)
    row = results["recipes"]["bf16-mixed"]
    row["val_gap_pct"], row["val_gap_spread_pct"] = 0.003, spread
    row["train_gap_pct"], row["train_gap_spread_pct"] = 0.002, spread
    row["verdict"], row["meets_target"] = verdict(0.003, spread, Target(1.0, "--tolerance"), 2)
    report, page = _written(results, tmp_path)
    cells = _loss_row(report, "bf16-mixed")
    digits = 4 if spread == 0.0004 else 5
    assert cells[3] == f"+{0.002:.{digits}f}% ± {spread:.{digits}f}"
    assert cells[4] == f"+{0.003:.{digits}f}% ± {spread:.{digits}f}"
    # the verdict beside it, at the same decimals: twice the spread, not zero either
    assert f"2x seed spread {2 * spread:.{digits}f}%, difference significant" in row["verdict"]
    for cell in cells[3:5]:
        assert f"<td>{html.escape(cell)}</td>" in page


def test_the_forgets_heading_says_so_when_no_label_dropped(image_results, tmp_path):
    """The heading said "the 3 labels whose validation accuracy drops most" above rows that all
    read "no label dropped"."""
    results = copy.deepcopy(image_results.results)
    per_label = results["recipes"]["bf16-mixed"]["per_label"]
    assert per_label
    for counts in per_label.values():
        counts["recipe"], counts["change_pp"] = counts["baseline"], 0.0
    report, page = _written(results, tmp_path)
    heading = "What the model forgets: no label's validation accuracy drops against the baseline"
    assert f"{heading} (over the whole validation split" in report
    assert "| bf16-mixed | no label dropped |" in report
    assert "drops most" not in report and "drops most" not in page
    assert html.escape(heading) in page
    # a recipe that drops one: the heading names the labels that drop most, as before
    first = next(iter(per_label.values()))
    first["recipe"], first["change_pp"] = first["baseline"] - 0.5, -50.0
    report, _ = _written(results, tmp_path)
    assert (
        "What the model forgets: per recipe, up to 3 labels whose validation accuracy drops most "
        "against the baseline (by 0.05 pp or more)"
    ) in report
