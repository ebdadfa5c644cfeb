"""Session 35: `lowbit train --nproc 2` refuses the input a one-process run refuses as it sets up
(its --data, a --model folder, a --seq-len beyond the model's positions) in the launcher, before
any rank starts, with the one-process run's error line and exit status; before, each rank
refused it after its start (15-20 s)."""

from __future__ import annotations

import pytest
import torch.multiprocessing

from lowbit.cli import main

ARGV = ["train", "--device", "cpu", "--model", "nano", "--steps", "1", "--quiet"]


@pytest.fixture
def no_ranks(monkeypatch):
    """The ranks the launcher started: none may start (a start fails the run at once)."""
    started = []

    def start_processes(*args, **kwargs):
        started.append(kwargs.get("nprocs"))
        raise AssertionError("a rank was started")

    monkeypatch.setattr(torch.multiprocessing, "start_processes", start_processes)
    return started


def _bad_input(tmp_path, case: str) -> list[str]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "records.jsonl").write_text('{"body": "a text"}\n' * 4)
    (tmp_path / "latin1.txt").write_bytes("un café\n\nau lait\n\n".encode("latin-1") * 40)
    return {
        "missing": ["--data", str(tmp_path / "missing.txt")],
        "empty": ["--data", str(tmp_path / "empty.txt")],
        "json field": ["--data", str(tmp_path / "records.jsonl")],
        "conll": ["--task", "token-classification", "--data", str(tmp_path / "missing.conll")],
        "model folder": ["--model", str(tmp_path / "folder")],
        "seq len": ["--seq-len", "100000"],  # nano has 1024 positions
        "not utf-8": ["--data", str(tmp_path / "latin1.txt")],  # no NUL byte: text, not UTF-8
    }[case]


@pytest.mark.parametrize(
    "case", ["missing", "empty", "json field", "conll", "model folder", "seq len", "not utf-8"]
)
def test_bad_input_is_refused_as_one_process_does_before_any_rank(tmp_path, capsys, no_ranks, case):
    argv = [*ARGV, *_bad_input(tmp_path, case)]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 2
    alone = capsys.readouterr().err.splitlines()[-1]
    assert alone.startswith("lowbit: error: ")
    assert main([*argv, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [alone]
    assert no_ranks == []
    assert not (tmp_path / "two").exists()


def test_a_bad_collective_timeout_is_refused_before_any_rank(
    tmp_path, capsys, no_ranks, monkeypatch
):
    """``LOWBIT_DIST_TIMEOUT``, which the ranks inherit, is read by each as it joins the group."""
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", "10m")
    assert main([*ARGV, "--out", str(tmp_path / "run"), "--nproc", "2"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lowbit: error: LOWBIT_DIST_TIMEOUT=10m is not a positive number")
    assert no_ranks == []


def test_the_launcher_does_not_read_all_of_healthy_data_nor_swallow_its_warnings(
    tmp_path, capsys, no_ranks, monkeypatch
):
    """The launcher read and fingerprinted all of --data before the ranks started (~2 minutes a
    GB, on every healthy start), its warnings silenced but recorded as said, so a one-process
    load later in the same Python process never printed them."""
    import lowbit.data.corpus as corpus
    from lowbit.data import load_corpus

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some text\n\nmore text\n" * 40, encoding="utf-8")
    (data / "notes.rst").write_text("a text file a folder does not read\n", encoding="utf-8")
    read = []
    real = corpus._read_texts
    monkeypatch.setattr(corpus, "_read_texts", lambda *a: read.append(a) or real(*a))
    argv = [*ARGV, "--data", str(data), "--out", str(tmp_path / "run"), "--nproc", "2"]
    with pytest.raises(AssertionError, match="a rank was started"):
        main(argv)
    assert read == [] and no_ranks == [2]
    capsys.readouterr()
    load_corpus(str(data))
    assert "1 text file not read (notes.rst)" in capsys.readouterr().err
