"""Session 36: `lowbit compare` refuses an input that only a run's set-up finds (a --data table,
data shorter than one window) before it writes anything: the study's compare.json was written
first, and with --overwrite an earlier study's runs were cleared before the refusal."""

import json

import pytest

from lowbit.cli import main

LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM_FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1"]


def _compare(out, *flags) -> int:
    argv = ["compare", *LM_FLAGS, "--quiet", "--no-plots", "--recipes", "fp32,bf16-mixed"]
    return main([*argv, "--out", str(out), *flags])


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n1,hello world\n2,foo bar\n")
    return path


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_table_leaves_no_study_behind(tmp_path, table, capsys, jobs):
    out = tmp_path / "study"
    assert _compare(out, "--data", str(table), "--jobs", jobs) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lowbit: error: {table}: a CSV table (columns: id, text)")
    assert not out.exists()


def test_data_shorter_than_a_window_leaves_no_study_behind(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("hi\n")
    out = tmp_path / "study"
    assert _compare(out, "--data", str(short)) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_with_a_bad_input_keeps_the_study_it_would_replace(tmp_path, table, capsys):
    """--overwrite cleared every run and rewrote compare.json before the first run's set-up
    refused the table: the folder was left with a report of runs that no longer existed."""
    out = tmp_path / "study"
    assert _compare(out) == 0
    files = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert _compare(out, "--overwrite", "--data", str(table)) == 2
    assert "a CSV table" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == files
    assert json.loads((out / "compare.json").read_text())["base"]["data"] in (None, "stdlib")
    assert _compare(out) == 0  # reused as it was
    printed = capsys.readouterr().out
    assert printed.count("(reused)") == 2, printed
