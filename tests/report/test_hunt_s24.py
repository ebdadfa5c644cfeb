"""Session 24's hunt through `lowbit compare`'s report (report.md, report.html, results.json) and
console output as a demanding user reads them: the per-label table of what the model forgets, the
gap by evaluation of a baseline that diverged at once, the baseline's own gaps, and transformers'
load report once per study."""

import json
import shutil

import pytest
import torch

from lowbit.cli import main
from lowbit.report import compare, make_study

IMAGES = {"task": "image-classification", "batch_size": 16, "steps": 2, "eval_batches": 1}
FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def quiet(line):
    pass


@pytest.fixture(scope="module")
def image_study(tmp_path_factory):
    """fp32 against bf16-pure on the digits, two seeds (tests copy it before editing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("s24") / "img"
    compare(make_study("fp32,bf16-pure", IMAGES, seeds=2, out=out), plots=False, log=quiet)
    torch.set_num_threads(threads)
    return out


def _with_per_label(image_study, tmp_path, base_seeds, recipe_seeds):
    """The study again, its runs' per-label counts ``{label: (correct, total)}`` as given, one
    per seed (``None``: the seed stopped on a non-finite loss, which leaves no counts)."""
    out = tmp_path / "img"
    shutil.copytree(image_study, out)
    for recipe, seeds in (("fp32", base_seeds), ("bf16-pure", recipe_seeds)):
        for seed, counts in enumerate(seeds):
            path = out / "runs" / recipe / f"seed-{seed}" / "compare.json"
            record = json.loads(path.read_text())
            if counts is None:
                record.update(final_metrics={}, per_label=None, diverged="non-finite loss")
            else:
                record["per_label"] = {
                    k: {"correct": c, "total": t} for k, (c, t) in counts.items()
                }
            path.write_text(json.dumps(record))
    return compare(make_study("fp32,bf16-pure", IMAGES, seeds=2, out=out), plots=False, log=quiet)


def _forgets_rows(report: str) -> list[str]:
    return [
        line for line in report.split("## What the model forgets")[1].splitlines() if "|" in line
    ][2:]


def test_what_the_model_forgets_lists_only_labels_that_dropped(image_study, tmp_path):
    """Labels that held or rose filled the table's three rows ("+0.0 pp", "+10.0 pp"), and a
    drop of 1 in 10,000 printed as "-0.0 pp"."""
    base = {"0": (10_000, 10_000), "1": (50, 100), "2": (50, 100), "3": (80, 100)}
    recipe = {"0": (9_999, 10_000), "1": (50, 100), "2": (60, 100), "3": (70, 100)}
    result = _with_per_label(image_study, tmp_path, [base, base], [recipe, recipe])
    report = (result.report_dir / "report.md").read_text()
    assert _forgets_rows(report) == ["| bf16-pure | 3 | 80.0% | 70.0% | -10.0 pp |"]
    page = (result.report_dir / "report.html").read_text()
    assert "<td>bf16-pure</td><td>3</td><td>80.0%</td><td>70.0%</td><td>-10.0 pp</td>" in page
    assert "0.0 pp" not in page.replace("-10.0 pp", "")


def test_a_label_with_a_less_than_sign_shows_in_the_markdown_table(image_study, tmp_path):
    """A tag such as "<PER>" read as the start of an HTML tag where the Markdown is rendered
    (GitHub), and the label vanished from its row; the html report escapes it already."""
    base = {"<PER>": (80, 100), "O": (50, 100)}
    recipe = {"<PER>": (70, 100), "O": (50, 100)}
    result = _with_per_label(image_study, tmp_path, [base, base], [recipe, recipe])
    report = (result.report_dir / "report.md").read_text()
    assert _forgets_rows(report) == ["| bf16-pure | \\<PER> | 80.0% | 70.0% | -10.0 pp |"]
    assert "<td>&lt;PER&gt;</td>" in (result.report_dir / "report.html").read_text()


def test_what_the_model_forgets_says_so_when_no_label_dropped(image_study, tmp_path):
    base = {"0": (50, 100), "1": (50, 100)}
    recipe = {"0": (50, 100), "1": (90, 100)}
    result = _with_per_label(image_study, tmp_path, [base, base], [recipe, recipe])
    report = (result.report_dir / "report.md").read_text()
    assert _forgets_rows(report) == ["| bf16-pure | no label dropped | — | — | — |"]
    assert (
        "<td>bf16-pure</td><td>no label dropped</td>"
        in (result.report_dir / "report.html").read_text()
    )


def test_what_the_model_forgets_compares_the_seeds_both_runs_finished(image_study, tmp_path):
    """With the recipe's seed 1 stopped by a non-finite loss, its seed 0 was set against the
    baseline pooled over seeds 0 and 1: the baseline's seed 1 read as what the recipe forgets."""
    counts = {"0": (50, 100), "1": (50, 100)}
    other = {"0": (10, 100), "1": (90, 100)}
    result = _with_per_label(image_study, tmp_path, [counts, other], [counts, None])
    per_label = result.results["recipes"]["bf16-pure"]["per_label"]
    assert {name: c["change_pp"] for name, c in per_label.items()} == {"0": 0.0, "1": 0.0}
    report = (result.report_dir / "report.md").read_text()
    assert _forgets_rows(report) == ["| bf16-pure | no label dropped | — | — | — |"]


def test_the_baseline_row_has_no_gap_to_itself(image_study):
    """Its train gap read "+0.000%" beside a val gap of "—"."""
    report_dir = image_study / "report"
    base_row = next(
        line for line in (report_dir / "report.md").read_text().splitlines()
        if line.startswith("| fp32 (baseline) |")
    )  # fmt: skip
    assert base_row.split(" | ")[3:5] == ["—", "—"]
    assert "<td>fp32 (baseline)</td><td>" in (page := (report_dir / "report.html").read_text())
    assert page.split("<td>fp32 (baseline)</td>")[1].split("</tr>")[0].count("<td>—</td>") == 3
    base = json.loads((report_dir / "results.json").read_text())["recipes"]["fp32"]
    assert base["train_gap_pct"] == base["val_gap_pct"] == 0  # the same for both, as before


def test_gap_by_evaluation_says_why_when_the_baseline_diverged_before_evaluating(tmp_path, capsys):
    """The table was a header of "recipe" alone over a row of recipe names."""
    out = tmp_path / "div"
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", *FLAGS, "--steps", "4"]
    # an lr far past divergence: at 1e6 one CPU's fp32 still evaluated at step 2
    argv += ["--eval-interval", "2", "--lr", "1e12", "--warmup-steps", "0", "--no-plots"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    report = (out / "report" / "report.md").read_text()
    section = report.split("## Validation gap by evaluation")[1].split("##")[0]
    assert "|" not in section
    why = "none, the baseline fp32 has no validation loss after the start (seed 0 diverged"
    assert why in section
    page = (out / "report" / "report.html").read_text()
    html_section = page.split("<h2>Validation gap by evaluation</h2>")[1].split("<h2>")[0]
    assert why in html_section and "<table>" not in html_section


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "self", "(", ")", ":"]


def test_transformers_load_report_is_printed_once_per_study(tmp_path, caplog):
    """Every run of a study printed transformers' load report of the --model folder (the fresh
    classification head "MISSING ... newly initialized"), a dozen lines per recipe and seed;
    `lowbit train` prints it once."""
    import transformers

    model = tmp_path / "deberta"
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(model)
    config = transformers.DebertaV2Config(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    transformers.DebertaV2Model(config).save_pretrained(model)
    data = tmp_path / "conll"
    data.mkdir()
    sentence = "\n".join(f"{w} {'B-KW' if w in ('def', 'return') else 'O'}" for w in WORDS[5:])
    for split in ("train", "dev", "test"):
        (data / f"{split}.txt").write_text((sentence + "\n\n") * 8)
    argv = ["compare", "--task", "token-classification", "--model", str(model), "--data", str(data)]
    argv += ["--recipes", "fp32,bf16-mixed", "--seeds", "2", "--steps", "1", "--batch-size", "8"]
    assert main([*argv, "--quiet", "--no-plots", "--out", str(tmp_path / "study")]) == 0
    reports = [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "newly initialized" in reports[0].getMessage()


def test_a_target_for_the_baseline_is_a_one_line_error(tmp_path, capsys):
    """It was taken and never read: the baseline is not judged."""
    argv = ["compare", "--recipes", "bf16-mixed,fp32", "--baseline", "fp32", *FLAGS]
    assert main([*argv, "--target", "fp32=0.1", "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert "--target fp32: fp32 is the baseline, which is not judged" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "study").exists()
