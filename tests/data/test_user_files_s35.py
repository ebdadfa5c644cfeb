"""Session 35: a user's own data files as `lowbit train --data` reads them: a CSV or TSV table is
refused with the command that writes its text column as JSON Lines, rather than trained on as
plain text (its header, ids and commas)."""

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
    command = re.search(r'python -c ".*" \S+ > \S+', err).group()
    subprocess.run(["bash", "-c", sys.executable + command[len("python") :]], check=True)
    jsonl = path.with_suffix(".jsonl")
    first = json.loads(jsonl.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "0", "text": "review number 0 was fine"}
    corpus = load_corpus(str(jsonl))
    assert sum(len(docs) for docs in corpus.splits.values()) == ROWS


def test_a_glob_of_tables_is_refused_and_a_glob_of_everything_reads_them(tmp_path):
    """``--data 'data/*.csv'`` asks for tables as plainly as one file does; ``'data/**/*'``
    (the glob a folder's warning offers for its other text files) reads every file as it is."""
    _table(tmp_path / "a.csv", ",")
    with pytest.raises(UsageError, match=r"a\.csv: a CSV table"):
        load_corpus(str(tmp_path / "*.csv"))
    (tmp_path / "b.txt").write_text("plain text\n", encoding="utf-8")
    splits = load_corpus(str(tmp_path / "**" / "*")).splits
    assert {d.name for docs in splits.values() for d in docs} == {"a.csv", "b.txt"}
