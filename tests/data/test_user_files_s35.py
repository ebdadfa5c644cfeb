"""Session 35: a user's own data files as `lowbit train --data` reads them: a new run refuses a CSV
or TSV table with the command that writes its text column as JSON Lines, rather than train on it
as plain text (its header, ids and commas); a run trained on one before is still resumed and
evaluated on it."""

import json
import re
import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus
from lowbit.errors import UsageError

ROWS = 120


def _table(path, sep):
    # Excel's "CSV UTF-8" opens with a byte-order mark
    lines = [f"\ufeffid{sep}text", *(f'{i}{sep}"review number {i} was fine"' for i in range(ROWS))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name, sep", [("reviews.csv", ","), ("reviews.tsv", "\t")])
def test_a_table_file_is_refused_with_the_command_that_converts_it(tmp_path, name, sep, capsys):
    """``--data reviews.csv`` read the table as one paragraph of plain text and stopped at "the
    validation split is empty ... paragraphs of one text file (a blank line between them)", a
    fix that trained on the header and ids; with blank lines in it, it trained on them."""
    path = _table(tmp_path / name, sep)
    argv = ["train", "--data", str(path), "--model", "nano", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lowbit: error: {path}: a ")
    assert "(columns: id, text)" in err and "--text-field" in err
    assert not (tmp_path / "run").exists()
    # the fix's command, run as printed (no package needed), writes JSON Lines the run reads
    # python3: stock Debian and Ubuntu have no `python`
    command = re.search(r'python3 -c ".*" \S+ > \S+', err).group()
    subprocess.run(["bash", "-c", sys.executable + command[len("python3") :]], check=True)
    jsonl = path.with_suffix(".jsonl")
    first = json.loads(jsonl.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "0", "text": "review number 0 was fine"}
    corpus = load_corpus(str(jsonl))
    assert sum(len(docs) for docs in corpus.splits.values()) == ROWS


def _new_run(tmp_path, data) -> int:
    return main(["train", "--data", str(data), "--model", "nano", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("pattern", ["*.csv", "*", "**/*"])
def test_a_glob_that_matches_a_table_is_refused_for_a_new_run(tmp_path, capsys, pattern):
    """``'data/*.csv'`` asks for tables as plainly as one file does; ``'data/*'`` read them as
    text without a word, and ``'data/**/*'`` was what a folder's warning offered for them."""
    data = tmp_path / "data"
    data.mkdir()
    _table(data / "a.csv", ",")
    (data / "b.txt").write_text("plain text\n", encoding="utf-8")
    assert _new_run(tmp_path, data / pattern) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lowbit: error: {data / pattern}: matches 1 table (a.csv)")
    assert "(columns: id, text)" in err and "python3 -c" in err
    assert not (tmp_path / "run").exists()


def test_a_run_trained_on_a_table_before_is_resumed_and_evaluated(tmp_path, monkeypatch, capsys):
    """The refusal sat in the data's read, so a run trained on a .csv before it could neither be
    resumed nor evaluated, and renamed .txt its data no longer matched the run's fingerprint."""
    import lowbit.data.corpus

    data, out = tmp_path / "old.csv", str(tmp_path / "run")
    rows = (f'{i},"review number {i} was fine"' for i in range(ROWS))
    data.write_text("id,text\n\n" + "\n\n".join(rows) + "\n", encoding="utf-8")  # paragraphs
    argv = ["--model", "nano", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
    with monkeypatch.context() as before:  # a run from before the refusal
        before.setattr(lowbit.data.corpus, "check_not_tables", lambda source: None)
        argv += ["--eval-interval", "2", "--quiet"]
        assert main(["train", "--data", str(data), *argv, "--steps", "2", "--out", out]) == 0
    assert main(["train", "--resume", out, "--steps", "3", "--quiet"]) == 0
    assert main(["eval", out]) == 0
    assert "error" not in capsys.readouterr().err


def test_a_table_is_refused_by_its_first_line_alone(tmp_path, capsys):
    """Its header was read by decoding the whole file (a 310 MB CSV took 6.9 s and 837 MB), and a
    byte that is not UTF-8 in a later row stopped it there with "not UTF-8 text"."""
    path = _table(tmp_path / "latin.csv", ",")
    with path.open("ab") as file:
        file.write(b'999,"caf\xe9"\n')
    assert _new_run(tmp_path, path) == 2
    assert "a CSV table (columns: id, text)" in capsys.readouterr().err


def test_a_folder_of_tables_names_them_and_a_folders_warning_does_not_read_them_as_text(
    tmp_path, capsys
):
    """A folder holding only CSVs said "no text found"; one holding a CSV beside its text warned
    with the glob ``'DIR/**/*'`` as the fix, which trains on the table as text."""
    data = tmp_path / "data"
    data.mkdir()
    _table(data / "reviews.csv", ",")
    with pytest.raises(
        UsageError, match=r"holds none, only tables \(reviews\.csv\); fix: .*python3"
    ):
        load_corpus(str(data))
    (data / "notes.txt").write_text("some text\n\nmore text\n" * 40, encoding="utf-8")
    load_corpus(str(data))
    err = capsys.readouterr().err
    assert "1 file not read (reviews.csv)" in err and "python3 -c" in err
    assert "**" not in err
