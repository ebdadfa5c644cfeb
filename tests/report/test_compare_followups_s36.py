"""Session 36 follow-ups of `lowbit compare`'s set-up of its first new run before the study
writes anything: with --jobs the main process checks the inputs without building a model (it
built a whole Trainer only to throw it away, and held its memory for the whole study); a Ctrl-C
in that set-up under --overwrite said to run the command without --overwrite, though nothing was
cleared yet; the first run's "(trained in Ns)" left its set-up out."""

import importlib
import re
import time

import pytest

import lowbit.train.trainer
from lowbit.cli import main

LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM_FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1"]


def _compare(out, *flags) -> int:
    argv = ["compare", *LM_FLAGS, "--quiet", "--no-plots", "--recipes", "fp32,bf16-mixed"]
    return main([*argv, "--out", str(out), *flags])


def _files(out) -> dict:
    return {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}


@pytest.fixture
def trainers(monkeypatch):
    """The `Trainer`s this process builds, with the seconds each took to set up; ``slow_first``
    adds that many seconds to the first one's set-up."""
    built, init = [], lowbit.train.trainer.Trainer.__init__
    options = {"slow_first": 0.0}

    def counted(self, *args, **kwargs):
        start = time.perf_counter()
        if not built:
            time.sleep(options["slow_first"])
        init(self, *args, **kwargs)
        built.append(time.perf_counter() - start)

    monkeypatch.setattr(lowbit.train.trainer.Trainer, "__init__", counted)
    return built, options


def test_jobs_check_the_first_run_without_building_it_here(tmp_path, trainers, monkeypatch):
    """The check still refuses what it did (a --seq-len past the positions, before anything is
    written), and a valid study reaches its workers with no model built in this process (a
    Ctrl-C as they start stands for them: spawning them takes a minute here)."""
    import lowbit.report.parallel

    built, _ = trainers
    out = tmp_path / "study"
    assert _compare(out, "--jobs", "2", "--seq-len", "4096") == 2
    assert not out.exists()

    def interrupted(runs, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit.report.parallel, "train_runs", interrupted)
    assert _compare(out, "--jobs", "2") == 130
    assert built == []


def test_the_first_runs_time_counts_its_set_up(tmp_path, trainers, capsys):
    built, options = trainers
    options["slow_first"] = 2.0
    assert _compare(tmp_path / "study") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("[1/2] fp32 seed 0:"), first
    seconds = int(re.search(r"\(trained in (\d+)s\)", first).group(1))
    assert seconds >= round(built[0]), (first, built)


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "study"
    assert _compare(out) == 0
    return out


def test_a_ctrl_c_in_the_set_up_under_overwrite_says_nothing_changed(study, capsys, monkeypatch):
    """The earlier study is intact: the command without --overwrite would reuse its runs (or
    refuse other settings); the same command goes on."""
    files = _files(study)
    capsys.readouterr()

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit.train.trainer.Trainer, "__init__", ctrl_c)
    assert _compare(study, "--overwrite", "--lr", "0.01") == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "lowbit: interrupted before the study changed anything; run the same command again "
        f"(out {study})"
    )
    assert _files(study) == files


def test_a_ctrl_c_says_without_overwrite_only_once_the_runs_are_cleared(study, capsys, monkeypatch):
    """While --overwrite clears the earlier runs the same command goes on; once `clear_runs` has
    run, the command without --overwrite resumes (as before)."""
    capsys.readouterr()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lowbit.train.trainer, "clear_run_dir", ctrl_c)
        assert _compare(study, "--overwrite") == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"lowbit: interrupted before any run trained; run the same command again (out {study})"
    )
    # the module: `lowbit.report.compare` is the function of that name
    monkeypatch.setattr(importlib.import_module("lowbit.report.compare"), "run_one", ctrl_c)
    assert _compare(study, "--overwrite") == 130
    assert "run the same command again without --overwrite" in capsys.readouterr().err
