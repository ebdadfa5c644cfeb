"""Session 34's follow-ups to `lowbit compare`: a --jobs study starts workers only for the runs
left to train, and benchmarks/optimizer_states.py refuses an unknown recipe before any work."""

import json
import shutil

import pytest

import lowbit.data
from lowbit.cli import main
from lowbit.report import parallel

# the digits CNN: which runs go to workers is the same for every task, and its workers start
# without importing transformers (seconds of CPU each)
FLAGS = ["--task", "image-classification", "--batch-size", "4"]
FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1"]


def _compare(out, *flags) -> int:
    argv = ["compare", *FLAGS, "--quiet", "--no-plots", "--recipes", "fp32,bf16-mixed"]
    return main([*argv, "--out", str(out), *flags])


def _no_workers(*args, **kwargs):
    raise AssertionError("a worker pool was started")


def test_a_finished_study_rerun_with_jobs_starts_no_worker(tmp_path, monkeypatch, capsys):
    """Every run finished: `lowbit compare --jobs 2` spawned two interpreters that imported
    PyTorch (seconds each, 13 s against 0.1 s without --jobs on a busy machine) only to read
    the runs' records."""
    out = tmp_path / "study"
    assert _compare(out, "--threads", "1") == 0
    capsys.readouterr()
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", _no_workers)
    assert _compare(out, "--jobs", "2") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[1/2] study: fp32 seed 0: validation loss ")
    assert printed[1].startswith("[2/2] study: bf16-mixed seed 0: validation loss ")
    assert all(line.endswith("(reused)") for line in printed[:2])


def test_the_one_run_left_under_jobs_trains_in_one_worker_under_the_studys_load(
    tmp_path, monkeypatch, capsys
):
    """A --jobs 2 study resumed with one run of two left (its folder deleted): both runs went to
    workers, the finished one only to be read. Now one worker trains the run left, under the load
    the study's runs trained with (its threads, 2 jobs): on more threads its speed would not
    compare with the finished run's, and the report would warn of mixed loads."""
    out = tmp_path / "study"
    assert _compare(out, "--jobs", "2") == 0
    before = json.loads((out / "report" / "results.json").read_text())
    (finished,) = before["runs"]["fp32"]
    shutil.rmtree(out / "runs" / "bf16-mixed")
    capsys.readouterr()
    pools = []

    class Pool(parallel.ProcessPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", Pool)
    assert _compare(out, "--jobs", "2") == 0
    assert pools == [1]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[1/2] study: fp32 seed 0: validation loss ")
    assert printed[0].endswith("(reused)")
    assert printed[1].startswith("[2/2] study: bf16-mixed seed 0: validation loss ")
    assert "(trained; " in printed[1] and printed[1].endswith(", 2 jobs)")
    results = json.loads((out / "report" / "results.json").read_text())
    (run,) = results["runs"]["bf16-mixed"]
    assert run["jobs"] == finished["jobs"] == 2 and run["threads"] == finished["threads"]
    report = (out / "report" / "report.md").read_text()
    assert "different loads" not in report and "thread counts" not in report


@pytest.mark.parametrize("recipe", ["fp8-rowise", "no-such-recipe"])
def test_optimizer_states_refuses_an_unknown_recipe_before_any_work(
    recipe, tmp_path, monkeypatch, as_script
):
    """The unknown --recipe was found by the first run's set-up, after the corpus was read and
    tokenized (about 10 s on a busy machine)."""

    def read(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(lowbit.data, "load_corpus", read)
    done = as_script("optimizer_states", "--recipe", recipe, "--steps", "1", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"optimizer_states.py: error: unknown recipe {recipe!r}")
    if recipe == "fp8-rowise":  # the near miss named, as `lowbit train` names it
        assert line.endswith("fix: did you mean 'fp8-rowwise'?")
