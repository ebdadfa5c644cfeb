"""Session 25's second hunt through `lowbit compare`'s report and `benchmarks/parity.py`: the load
a resumed run's throughput was measured under, the parity tables' cells, a run length in epochs,
and the settings results.json records."""

import copy
import json
import math
import os
import random
import shutil
import signal
import threading
import time

import pytest

from lowbit.cli import main
from lowbit.report import compare, make_study
from lowbit.report.compare import run_one
from lowbit.report.markdown import write_markdown
from tests.once import folder_once_per_session
from tests.report.conftest import quiet, study_on_one_thread

LM = {"model": "nano", "seq_len": 16, "batch_size": 4, "eval_batches": 1}


@pytest.fixture(scope="module")
def lm_study(tmp_path_factory):
    """fp32 against bf16-mixed on the tiny causal LM, one seed (tests copy it before editing),
    compared once per session."""
    settings = {**LM, "steps": 4, "eval_interval": 2, "warmup_steps": 1}

    def make(folder):
        return study_on_one_thread(folder / "lm", "fp32,bf16-mixed", settings, seeds=1)

    return folder_once_per_session(tmp_path_factory, "hunt-s25b", make)


def _interrupt_when(condition) -> threading.Thread:
    """A thread that sends this process a SIGINT (a Ctrl-C) once ``condition()`` holds."""

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if condition():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_run_begun_under_two_jobs_and_resumed_alone_keeps_the_shared_load(tmp_path):
    """A run interrupted while it trained beside another (--jobs 2) and resumed with --jobs 1 was
    recorded as ``jobs: 1``, though its throughput counts the steps measured under the shared
    load too: a study of such runs had no word about the load in its report."""
    settings = {**LM, "steps": 60, "eval_interval": 60, "save_interval": 20, "warmup_steps": 1}
    study = make_study("fp32", settings, seeds=1, out=tmp_path / "study")
    run_dir = study.run_dir("fp32", 0)
    watcher = _interrupt_when(lambda: any(run_dir.glob("checkpoints/step-*.pt")))
    with pytest.raises(KeyboardInterrupt):  # as in a worker of --jobs 2: Ctrl-C, a checkpoint
        run_one(study, "fp32", 0, jobs=2)
    watcher.join()
    assert not (run_dir / "compare.json").exists() and list(run_dir.glob("checkpoints/*.pt"))
    result = compare(study, plots=False, log=quiet)  # resumed, one run at a time
    (record,) = result.results["runs"]["fp32"]
    assert record["resumed"] and record["jobs"] == 2
    assert result.results["speed_load"] == [2]
    assert "trained up to 2 at a time (--jobs 2)" in (result.report_dir / "report.md").read_text()
    # --overwrite retrains it alone: the earlier parts' load goes with them
    result = compare(study, overwrite=True, plots=False, log=quiet)
    assert result.results["runs"]["fp32"][0]["jobs"] == 1 and result.results["speed_load"] == [1]


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_parity_tables_are_written_as_report_md_writes_them(lm_study, parity, tmp_path):
    """`benchmarks/parity.py` wrote its own tables: a ``|`` in a label (a tag such as
    ``B-ORG|LOC``) split its cell and shifted the row's later columns, and a table without a
    header (a baseline that did not evaluate) came out as two stray lines ``|  |`` and ``|``."""
    results = copy.deepcopy(lm_study.results)
    results["recipes"]["bf16-mixed"]["per_label"] = {
        "B-ORG|LOC": {"baseline": 0.5, "recipe": 0.25, "change_pp": -25.0}
    }
    write_markdown(results, tmp_path / "report.md")
    section = parity.markdown({"causal-lm": results}, "python benchmarks/parity.py", "")
    assert _table_lines(section) == _table_lines((tmp_path / "report.md").read_text())
    assert "| bf16-mixed | B-ORG\\|LOC | 50.0% | 25.0% | -25.0 pp |" in section
    for row in results["recipes"].values():  # no evaluation after the start
        row["curves"]["validation"] = row["curves"]["validation"][:1]
    write_markdown(results, tmp_path / "report.md")
    section = parity.markdown({"causal-lm": results}, "python benchmarks/parity.py", "")
    assert _table_lines(section) == _table_lines((tmp_path / "report.md").read_text())
    assert "Validation gap by evaluation: none, the baseline fp32 has no validation loss" in section


def test_parity_names_the_non_finite_evaluations_as_report_md_does(lm_study, parity):
    """A seed whose validation loss was NaN at an evaluation: the parity tables read
    "non-finite" there without the sentence report.md has, saying whose and where."""
    results = copy.deepcopy(lm_study.results)
    row = results["recipes"]["bf16-mixed"]
    row["non_finite_evaluations"] = {0: [2]}
    row["curves"]["validation"] = [
        [s, math.nan if s == 2 else v] for s, v in row["curves"]["validation"]
    ]
    section = parity.markdown({"causal-lm": results}, "python benchmarks/parity.py", "")
    assert "| bf16-mixed | non-finite |" in section
    assert "Non-finite validation loss" in section and "bf16-mixed seed 0 at step 2." in section


def test_a_run_length_in_epochs_is_described_as_given(tmp_path, capsys):
    """``--epochs 1`` was described as "1.0 epochs" (the setting is a float)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
    rng = random.Random(0)
    paragraphs = (" ".join(rng.choice(words) for _ in range(4)) for _ in range(100))
    data = tmp_path / "small.txt"
    data.write_text("\n\n".join(paragraphs))  # one document per paragraph: ~30 steps an epoch
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", "--model", "nano", "--seq-len", "16"]
    argv += ["--batch-size", "4", "--eval-batches", "1", "--data", str(data), "--epochs", "1"]
    assert main([*argv, "--quiet", "--no-plots", "--out", str(tmp_path / "study")]) == 0
    capsys.readouterr()
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "Task causal-lm, model nano, 1 epoch, batch 4 x seq 16," in report


def test_results_record_whether_the_parity_targets_were_used(lm_study, tmp_path):
    """``--no-parity-targets`` judges bf16-mixed by --tolerance instead of its 0.5% parity
    target: results.json's settings did not say so (only each row's target source did)."""
    out = tmp_path / "lm"
    shutil.copytree(lm_study.study.out, out)
    settings = json.loads((out / "report" / "results.json").read_text())["settings"]
    assert settings["parity_targets"] is True
    study = make_study("fp32,bf16-mixed", lm_study.study.base, seeds=1, out=out)
    study.parity_targets = False
    result = compare(study, plots=False, log=quiet)
    assert result.trained == []  # the runs are reused
    saved = json.loads((result.report_dir / "results.json").read_text())
    assert saved["settings"]["parity_targets"] is False
    assert saved["recipes"]["bf16-mixed"]["target"] == {
        "pct": 1.0,
        "source": "--tolerance",
        "expect_worse": False,
    }
