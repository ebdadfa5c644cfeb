"""`lowbit compare` on tiny settings: the report files, reuse of finished runs, resume of an
interrupted one, per-label changes, verdicts, and clean errors."""

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.report import compare, make_study
from lowbit.report.compare import PARITY_TARGETS, Target, verdict
from lowbit.report.markdown import tables
from lowbit.train import TrainConfig, train
from tests.once import folder_once_per_session
from tests.report.conftest import IMAGES

LM = {"task": "causal-lm", "seq_len": 16, "batch_size": 4, "eval_batches": 1}
LM_STEPS = {"steps": 6, "eval_interval": 3, "warmup_steps": 2}
RECIPES = "fp32,bf16-mixed"


def lm_study(out, recipes=RECIPES, seeds=2):
    return make_study(recipes, {**LM, **LM_STEPS}, seeds=seeds, out=out)


@pytest.fixture(scope="module")
def study_result(tmp_path_factory):
    """fp32 against bf16-mixed, two seeds, compared once per session (tests that compare again
    compare a copy)."""

    def make(folder):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return compare(lm_study(folder / "study"), log=lambda line: None)
        finally:
            torch.set_num_threads(threads)

    return folder_once_per_session(tmp_path_factory, "compare", make)


def _copy(study_result, tmp_path):
    """A study of ``study_result``'s settings in a copy of its folder, to compare again."""
    study = lm_study(tmp_path / "copy")
    shutil.copytree(study_result.study.out, study.out)
    return study


def test_report_files_tables_and_verdicts(study_result):
    folder = study_result.report_dir
    for name in (
        "report.md",
        "report.html",
        "results.json",
        "loss_curves.png",
        "final_gap.png",
        "speed_memory.png",
    ):
        assert (folder / name).is_file(), name
    assert sorted(study_result.trained) == [(r, s) for r in ("bf16-mixed", "fp32") for s in (0, 1)]
    results = json.loads((folder / "results.json").read_text())
    assert results["baseline"] == "fp32"
    base, other = results["recipes"]["fp32"], results["recipes"]["bf16-mixed"]
    assert base["val_gap_pct"] == 0 and base["throughput_ratio"] == pytest.approx(1.0)
    # the gap is the paired difference of the final validation losses, in percent of the baseline
    runs = results["runs"]
    diffs = [
        100 * (r["final_metrics"]["loss"] - b["final_metrics"]["loss"])
        for r, b in zip(runs["bf16-mixed"], runs["fp32"])
    ]
    base_mean = sum(b["final_metrics"]["loss"] for b in runs["fp32"]) / 2
    assert other["val_gap_pct"] == pytest.approx(sum(diffs) / 2 / base_mean)
    assert other["target"]["pct"] == PARITY_TARGETS["bf16-mixed"].pct  # fp32 baseline: parity
    # memory by component, measured: fp32 parameters (4 B/param), Adam's two fp32 moments (8)
    assert base["bytes_per_param"]["parameters"] == pytest.approx(4.0)
    assert base["bytes_per_param"]["optimizer_states"] == pytest.approx(8.0, rel=0.01)
    md = (folder / "report.md").read_text()
    assert "| recipe | train loss | val loss | train gap | val gap | ppl |" in md
    assert "- bf16-mixed: " in md and other["verdict"] in md
    assert other["verdict"].split(":")[0] in ("PASS", "FAIL", "INCONCLUSIVE")
    html = (folder / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 3
    assert "src='http" not in html and ".png'" not in html  # self-contained
    assert other["verdict"] in html


def test_skipped_steps_read_as_a_count_and_a_spread_only_where_seeds_differ(study_result):
    results = copy.deepcopy(study_result.results)
    results["recipes"]["bf16-mixed"]["skipped_steps"] = (2 / 3, math.sqrt(4 / 3))  # seeds: 0, 0, 2
    _, header, rows = tables(results)[0]
    cell = {row[0]: row[header.index("skipped steps")] for row in rows}
    assert cell == {"fp32 (baseline)": "0", "bf16-mixed": "0.67 ± 1.15"}


def test_second_invocation_reuses_finished_runs(study_result, tmp_path):
    first = study_result.results
    again = compare(_copy(study_result, tmp_path), log=lambda line: None)
    assert again.trained == [] and len(again.reused) == 4
    for recipe in ("fp32", "bf16-mixed"):
        assert again.results["recipes"][recipe]["val_loss"] == first["recipes"][recipe]["val_loss"]
        assert again.results["recipes"][recipe]["verdict"] == first["recipes"][recipe]["verdict"]


def test_interrupted_run_is_resumed_to_the_same_loss(study_result, tmp_path):
    study = lm_study(tmp_path / "study", recipes="fp32", seeds=[0])
    # a run of the study stopped (Ctrl-C) after 4 of its 6 steps, with a checkpoint
    config = TrainConfig(
        **{**study.base, "recipe": "fp32", "seed": 0, "out": str(study.run_dir("fp32", 0))}
    )

    def stop(trainer):
        if trainer.step_idx == 4:
            trainer.stop_requested = True

    assert train(config, quiet=True, on_step=stop).status == "interrupted"
    result = compare(study, plots=False, log=lambda line: None)
    (record,) = result.results["runs"]["fp32"]
    assert record["resumed"] and record["steps"] == 6
    uninterrupted = study_result.results["runs"]["fp32"][0]
    assert record["final_metrics"]["loss"] == uninterrupted["final_metrics"]["loss"]


# Imported by the --jobs workers (spawned interpreters with its folder on PYTHONPATH): the file
# "transformers" in the folder LOWBIT_TEST_IMPORTS once a worker imports transformers.
WATCH_TRANSFORMERS = """
import os, sys
from pathlib import Path

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            Path(os.environ["LOWBIT_TEST_IMPORTS"], "transformers").touch()
        return None

if os.environ.get("LOWBIT_TEST_IMPORTS"):
    sys.meta_path.insert(0, Watch())
"""


def test_jobs_train_the_same_runs_in_worker_processes(image_study, tmp_path, monkeypatch):
    """--jobs 2: two runs at a time in spawned worker processes (one thread each, as the
    session's digits study was trained), every run bit-identical to the sequential study's. (The
    digits CNN: running a study in workers is the same for every task; causal-LM runs train in
    workers in test_compare_s30's --jobs tests.) Its workers import no transformers:
    quieting transformers' load report for every run after the study's first imported it (~0.6 s
    of CPU in each worker), though the CNN is no transformers model."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WATCH_TRANSFORMERS)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("LOWBIT_TEST_IMPORTS", str(hook))
    sequential = json.loads((image_study / "report" / "results.json").read_text())
    lines = []
    study = make_study("fp32,bf16-mixed", IMAGES, seeds=2, out=tmp_path / "study")
    result = compare(study, plots=False, log=lines.append, jobs=2, threads=1)
    runs = [(recipe, seed) for recipe in ("bf16-mixed", "fp32") for seed in (0, 1)]
    assert sorted(result.trained) == runs and result.reused == []
    # one line per run, as its worker finishes it (the runs were also listed a second time)
    assert len(lines) == 4 and all("(trained;" in line for line in lines)
    for recipe, records in sequential["runs"].items():
        assert len(result.results["runs"][recipe]) == len(records) == 2
        for ours, record in zip(result.results["runs"][recipe], records):
            assert ours["final_metrics"]["loss"] == record["final_metrics"]["loss"]
            assert ours["train_loss"] == record["train_loss"]
    again = compare(result.study, plots=False, log=lines.append, jobs=2, threads=1)
    assert again.trained == [] and len(again.reused) == 4
    # their throughput was measured two runs at a time, and the report says so
    assert result.results["speed_load"] == [2]
    assert "trained up to 2 at a time (--jobs 2)" in (result.report_dir / "report.md").read_text()
    assert not (hook / "transformers").exists()


def test_speed_table_warns_when_runs_trained_under_different_loads(study_result):
    assert study_result.results["speed_load"] == [1]  # one at a time: nothing to warn about
    assert "--jobs" not in (study_result.report_dir / "report.md").read_text()
    results = {**study_result.results, "speed_load": [1, 2]}  # a study continued with --jobs 2
    title = tables(results)[2][0]
    assert title.startswith("Speed and memory") and "WARNING" in title and "--jobs 1, 2" in title


def test_one_seed_reads_as_values_without_a_spread(study_result):
    results = copy.deepcopy(study_result.results)
    for row in results["recipes"].values():
        row["seeds"] = row["seeds"][:1]
    title, _, rows = tables(results)[0]
    assert "one seed" in title
    assert not any("±" in cell for row in rows for cell in row), rows
    both = tables(study_result.results)[0]  # two seeds: mean ± std
    assert all("±" in row[both[1].index("val loss")] for row in both[2])


def test_per_label_accuracy_change_on_image_classification(tmp_path):
    study = make_study(
        "fp32,bf16-pure",
        {"task": "image-classification", "batch_size": 32, "steps": 4, "eval_batches": 100},
        seeds=1,
        out=tmp_path / "img",
    )
    result = compare(study, log=lambda line: None)
    rows = result.results["recipes"]
    labels = rows["bf16-pure"]["per_label"]
    assert sorted(labels) == [str(d) for d in range(10)]
    # per-label accuracies pooled with their counts give the overall validation accuracy
    for recipe in ("fp32", "bf16-pure"):
        (run,) = result.results["runs"][recipe]
        counts = run["per_label"]
        pooled = sum(c["correct"] for c in counts.values()) / sum(
            c["total"] for c in counts.values()
        )
        assert pooled == pytest.approx(run["final_metrics"]["accuracy"])
    for c in labels.values():
        assert c["change_pp"] == pytest.approx(100 * (c["recipe"] - c["baseline"]))
    assert (result.report_dir / "per_label.png").is_file()
    md = (result.report_dir / "report.md").read_text()
    worst = min(labels.items(), key=lambda kv: kv[1]["change_pp"])
    assert f"| bf16-pure | {worst[0]} |" in md
    assert "1 seed: no spread" in rows["bf16-pure"]["verdict"]


@pytest.mark.parametrize(
    ("gap", "spread", "target", "seeds", "word", "ok"),
    [
        (0.3, 0.1, Target(0.5), 3, "PASS: within", True),
        (0.3, 0.2, Target(0.5), 3, "PASS (unresolved)", True),  # 0.3 + 2x0.2 > 0.5
        (-2.0, 0.1, Target(0.5), 3, "PASS", True),  # better than the baseline
        (1.5, 0.1, Target(0.5), 3, "FAIL", False),  # 1.0 above the target, 2x spread 0.2
        (0.7, 0.3, Target(0.5), 3, "INCONCLUSIVE", None),  # 0.2 above, within 2x spread 0.6
        (0.7, 0.0, Target(0.5), 1, "FAIL", False),  # one seed: the gap alone decides
        (3.0, 0.5, Target(1.0, expect_worse=True), 3, "as expected", True),
        (1.2, 0.5, Target(1.0, expect_worse=True), 3, "MISSES", False),
        (math.nan, 0.0, Target(1.0), 3, "FAIL", False),
    ],
)
def test_verdict(gap, spread, target, seeds, word, ok):
    line, meets = verdict(gap, spread, target, seeds)
    assert line.startswith(word) and meets is ok


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipes", "fp32,bf17-mixed"], "unknown recipe 'bf17-mixed'"),
        (["--recipes", "fp32,bf16-mixed", "--baseline", "fp16-mixed"], "baseline 'fp16-mixed'"),
        (["--recipes", "fp32,fp32"], "listed twice"),
        (["--recipes", "fp32,mxfp4", "--target", "mxfp4"], "RECIPE=PERCENT"),
        (["--recipes", "fp32,mxfp4", "--seeds", "0"], "--seeds must be positive"),
        (["--recipes", "fp32,mxfp4", "--jobs", "0"], "--jobs must be positive"),
        (["--recipes", "fp32", "--task", "speech"], "unknown task 'speech'"),
    ],
)
def test_bad_input_is_one_line_usage_error(argv, message, tmp_path, capsys):
    assert main(["compare", *argv, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "c").exists()  # nothing trained, nothing written


def test_folder_of_another_study_is_refused_naming_what_differs(study_result, tmp_path):
    # a copy: the refused compare makes and removes a folder in it (its write check), which a
    # copytree of the shared study on the other xdist worker could meet half-way
    study = _copy(study_result, tmp_path)
    lr = study.base["lr"]
    study.base = {**study.base, "lr": lr * 2}
    with pytest.raises(UsageError, match="other settings") as refused:
        compare(study, log=lambda line: None)
    assert f"lr {lr:.6g}, now {lr * 2:.6g}" in str(refused.value)


def test_other_checkpoint_settings_reuse_the_runs(study_result, tmp_path):
    """How often a run saved and how many checkpoints it kept do not change its losses."""
    study = _copy(study_result, tmp_path)
    study.base = {**study.base, "keep_last": 1, "save_interval": 1}
    again = compare(study, plots=False, log=lambda line: None)
    assert again.trained == [] and sorted(again.reused) == sorted(study_result.trained)


def test_another_baseline_or_recipe_subset_reuses_the_runs(study_result, tmp_path):
    """parity.py trains disjoint recipe subsets in parallel into one folder, each with its first
    recipe as baseline; the final run over every recipe reuses all of them."""
    import shutil

    study = lm_study(tmp_path / "copy")
    shutil.copytree(study_result.study.out, study.out)
    study.recipes = list(reversed(study.recipes))
    study.baseline = study.recipes[0]
    again = compare(study, plots=False, log=lambda line: None)
    assert again.trained == [] and len(again.reused) == 4
    assert again.results["baseline"] == study.baseline


def test_record_from_before_a_new_setting_is_still_reused(study_result, tmp_path):
    """A run recorded before TrainConfig gained a field (absent = its default) is reused."""
    import shutil

    study = lm_study(tmp_path / "copy")
    shutil.copytree(study_result.study.out, study.out)
    for path in (study.out / "runs").glob("*/*/compare.json"):
        record = json.loads(path.read_text())
        del record["config"]["grad_accum"]  # default 1
        path.write_text(json.dumps(record))
    again = compare(study, plots=False, log=lambda line: None)
    assert again.trained == [] and len(again.reused) == 4


def test_override_applies_to_every_run_and_keys_reuse(tmp_path, capsys):
    """``--override`` reaches every recipe's runs (bf16-mixed with an fp32 head converts that one
    layer) and is part of the settings: the same study without it is another study."""
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", "--out", str(tmp_path)]
    argv += ["--seq-len", "16", "--batch-size", "4", "--steps", "2", "--eval-batches", "1"]
    assert main([*argv, "--override", "lm_head=fp32", "--no-plots", "--quiet"]) == 0
    runs = sorted((tmp_path / "runs").glob("*/*/run.json"))
    conversions = {path.parts[-3]: json.loads(path.read_text())["conversion"] for path in runs}
    assert conversions["bf16-mixed"].startswith("converted 1/")
    records = (tmp_path / "runs").glob("*/*/compare.json")
    assert all(
        json.loads(p.read_text())["config"]["overrides"] == ["lm_head=fp32"] for p in records
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Layer overrides on every recipe: lm_head=fp32." in report
    capsys.readouterr()
    assert main([*argv, "--no-plots", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_emulation_warning_once_per_recipe_not_per_seed(tmp_path, capsys):
    argv = ["compare", "--recipes", "fp32,fp8-tensorwise", "--seeds", "2", "--out", str(tmp_path)]
    argv += ["--seq-len", "16", "--batch-size", "4", "--steps", "1", "--eval-batches", "1"]
    assert main([*argv, "--no-plots", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("recipe fp8-tensorwise has no native kernels on the CPU") == 1
    assert "recipe fp32 has no native kernels" not in err


def test_a_study_of_the_baseline_alone_says_there_is_nothing_to_judge(tmp_path, capsys):
    argv = ["compare", "--recipes", "fp32", "--seeds", "2", "--out", str(tmp_path)]
    argv += ["--seq-len", "16", "--batch-size", "4", "--steps", "2", "--eval-batches", "1"]
    assert main([*argv, "--no-plots", "--quiet"]) == 0
    assert "only the baseline (fp32) ran: no recipe to judge" in capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "- only the baseline (fp32) ran" in report
    assert "Validation gap by evaluation" not in report and "Speed and memory" in report


def test_loss_scale_reaches_only_the_recipes_that_scale_the_loss(tmp_path, capsys):
    """``--loss-scale`` in a study of fp32 against fp16-mixed sets fp16-mixed's starting scale and
    leaves fp32 as it is; a study without an fp16 recipe refuses it."""
    argv = ["compare", "--seeds", "1", "--seq-len", "16", "--batch-size", "4", "--steps", "2"]
    argv += ["--eval-batches", "1", "--loss-scale", "1024", "--no-plots", "--quiet"]
    assert main([*argv, "--recipes", "fp32,fp16-mixed", "--out", str(tmp_path / "a")]) == 0
    records = {
        path.parts[-3]: json.loads(path.read_text())["config"]
        for path in (tmp_path / "a" / "runs").glob("*/*/compare.json")
    }
    assert records["fp32"]["loss_scale"] is None
    assert records["fp16-mixed"]["loss_scale"] == 1024.0
    metrics = (tmp_path / "a" / "runs" / "fp16-mixed" / "seed-0" / "metrics.jsonl").read_text()
    steps = [json.loads(line) for line in metrics.splitlines()]
    assert next(s["loss_scale"] for s in steps if s["split"] == "train") in (1024.0, 512.0)
    report = (tmp_path / "a" / "report" / "report.md").read_text()
    assert "Loss scaling of the fp16 recipes: start 1024." in report
    capsys.readouterr()
    assert main([*argv, "--recipes", "fp32,bf16-mixed", "--out", str(tmp_path / "b")]) == 2
    assert "none of the recipes scales its loss" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_recipe_that_keeps_every_layer_is_flagged_in_the_verdicts(tmp_path):
    # nvfp4 keeps the first and last block in bf16: both blocks of the tiny token classifier.
    # A few CoNLL sentences: the per-label accuracies read the whole validation split, and the
    # built-in task parses a source tree first; the layers kept are the model's, whatever the data.
    data = tmp_path / "conll"
    data.mkdir()
    for split in ("train", "dev", "test"):
        (data / f"{split}.txt").write_text("\n".join(["Ann B-PER", "Lee I-PER", "ran O", ""] * 8))
    settings = {"task": "token-classification", "data": str(data), "seq_len": 16}
    settings.update(batch_size=4, steps=1, eval_batches=1)
    study = make_study("fp32,nvfp4,fp8-tensorwise", settings, seeds=1, out=tmp_path / "tok")
    result = compare(study, plots=False, log=lambda line: None)
    rows = result.results["recipes"]
    assert rows["nvfp4"]["layers"] == {
        "converted": 0, "total": 13, "kept_every_layer": True, "cpu_emulated": 0,
    }  # fmt: skip
    assert rows["fp8-tensorwise"]["layers"]["converted"] == 12
    md = (result.report_dir / "report.md").read_text()
    (nvfp4,) = [line for line in md.splitlines() if line.startswith("- nvfp4:")]
    (fp8,) = [line for line in md.splitlines() if line.startswith("- fp8-tensorwise:")]
    assert "none of the model's 13 GEMM layers is in the recipe's own formats" in nvfp4
    assert "note:" not in fp8


def test_the_no_layer_note_needs_layers_that_were_kept():
    from lowbit import Precision
    from lowbit.models import build_causal_lm
    from lowbit.report.markdown import verdict_lines

    def results(layers):
        row = {"verdict": "PASS", "layers": layers}
        return {"baseline": "fp32", "recipes": {"fp32": row, "r": row}}

    kept_all = {"converted": 0, "total": 13, "kept_every_layer": True}
    assert "note:" in verdict_lines(results(kept_all))[0]
    assert verdict_lines(results(None)) == ["r: PASS"]  # a record from before session 11
    # convert never runs for fp16-mixed on a GPU (autocast computes it): nothing was kept
    precision = Precision("fp16-mixed", device="cuda")
    precision.convert(build_causal_lm("tiny", 257))
    assert precision.conversion_report.kept == {} and not precision.keeps_every_layer
    nvfp4 = Precision("nvfp4")
    # no blocks: the first and last layer are the ends, kept; the middle one is converted
    nvfp4.convert(torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3))))
    assert not nvfp4.keeps_every_layer and set(nvfp4.conversion_report.converted) == {"1"}


def test_report_says_how_much_the_baseline_loss_still_moved(study_result):
    results = study_result.results
    curve = results["recipes"]["fp32"]["curves"]["validation"]  # steps 0, 3, 6 (mean over seeds)
    (s0, v0), (s1, v1) = curve[-2:]
    assert (s0, s1) == (3, 6)
    trend = results["baseline_trend"]
    assert trend["change_pct"] == pytest.approx(100 * (v1 - v0) / v0)
    assert (
        "The baseline's validation loss moved"
        in (study_result.report_dir / "report.md").read_text()
    )


@pytest.mark.parametrize(
    ("change", "still_falling"),
    [(-3.7, True), (-0.6, True), (-0.4, False), (+0.8, False)],
)
def test_trend_line_compares_the_last_fall_with_the_tightest_target(change, still_falling):
    from lowbit.report.compare import baseline_trend
    from lowbit.report.markdown import trend_line

    loss = 2.0 * (1 + change / 100)
    trend = baseline_trend([[0, 5.0], [100, 3.0], [200, 2.0], [300, loss]])
    assert trend["from_step"] == 200 and trend["change_pct"] == pytest.approx(change)
    row = {"target": {"pct": 0.5, "expect_worse": False}}
    worse = {"target": {"pct": 0.1, "expect_worse": True}}  # bf16-pure's claim is not a margin
    results = {"baseline": "fp32", "baseline_trend": trend, "recipes": {"fp32": row}}
    results["recipes"].update({"bf16-mixed": row, "bf16-pure": worse})
    line = trend_line(results)
    assert f"moved {change:+.2f}% over the last 100 steps" in line
    assert ("still falling by more than the tightest target (0.5%)" in line) == still_falling
    assert baseline_trend([[0, 5.0], [100, 3.0]]) is None  # one evaluation after the start
    assert trend_line({**results, "baseline_trend": None}) == ""


def test_gap_by_evaluation_is_the_paired_gap_at_each_step(study_result):
    from lowbit.report.compare import read_curves
    from lowbit.report.markdown import gap_by_evaluation

    results, study = study_result.results, study_result.study
    _, header, rows = gap_by_evaluation(results)
    assert header == ["recipe", "step 3", "step 6"]
    ((name, *cells),) = rows
    assert name == "bf16-mixed"

    def val(recipe, step):
        return [dict(read_curves(study.run_dir(recipe, s))["validation"])[step] for s in (0, 1)]

    for cell, step in zip(cells, (3, 6)):
        low, base = val("bf16-mixed", step), val("fp32", step)
        paired = 100 * sum(a - b for a, b in zip(low, base)) / sum(base)
        assert float(cell.rstrip("%")) == pytest.approx(paired, abs=1e-3)
    final_gap = results["recipes"]["bf16-mixed"]["val_gap_pct"]
    assert float(cells[-1].rstrip("%")) == pytest.approx(final_gap, abs=1e-3)
    md = (study_result.report_dir / "report.md").read_text()
    assert "## Validation gap by evaluation" in md and "| recipe | step 3 | step 6 |" in md


def test_a_finished_run_is_not_reused_after_its_data_changed(study_result, tmp_path):
    """The record keeps the data's fingerprint: a run trained on other contents of the same path
    (files edited, added or removed since) is refused, not reported as if it were current."""
    import shutil

    study = lm_study(tmp_path / "copy")
    shutil.copytree(study_result.study.out, study.out)
    path = next((study.out / "runs").glob("*/*/compare.json"))
    record = json.loads(path.read_text())
    assert record["data_fingerprint"]["train"]["files"] > 0
    record["data_fingerprint"]["train"]["sha256"] = "0" * 64  # as if a file had changed since
    path.write_text(json.dumps(record))
    with pytest.raises(UsageError, match="other contents"):
        compare(study, plots=False, log=lambda line: None)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_to_the_compare_process_alone_stops_its_workers(tmp_path, stop):
    """`kill -INT` or `kill -TERM` of the parent (a scheduler's stop) reaches only it: the workers
    must still save a checkpoint and stop, not train to the end while the parent waits (after a
    SIGTERM the parent died and left them training, orphaned)."""
    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", "--jobs", "2"]
    # the digits CNN: a stop is the same for every task, and its workers start without importing
    # transformers (seconds of CPU each)
    argv += ["--threads", "1", "--steps", "100000", "--task", "image-classification"]
    argv += ["--batch-size", "4", "--eval-interval", "100000", "--quiet", "--out", str(out)]
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from lowbit.cli import main; sys.exit(main({argv!r}))",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a signal to it reaches no worker
    )
    try:
        deadline = time.monotonic() + 300
        # both runs past their set-up, whose last slow part is the TensorBoard log (importing it
        # took 4.6 s in a fresh process on a busy machine): a stop before the training loop ends a
        # run without a checkpoint, as a Ctrl-C in its set-up does. Waiting for run.json (written
        # before it) and a second more failed once that part took 3 s. (metrics.jsonl's first
        # train row is no earlier sign: the file is buffered, written after some 40 steps.)
        while len(list(out.glob("runs/*/seed-0/tensorboard/events.out.tfevents.*"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1)  # the few milliseconds from there to the loop, with a wide margin
        started = time.monotonic()
        parent.send_signal(stop)
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert parent.returncode == 130, err.decode()[-2000:]
    assert time.monotonic() - started < 60
    runs = list(out.glob("runs/*/seed-0"))
    assert len(runs) == 2
    for run in runs:
        assert list((run / "checkpoints").glob("step-*.pt")), run  # stopped with a checkpoint
