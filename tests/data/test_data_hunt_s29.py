"""Session 29's hunt: `lowbit train --data PATH` as a demanding user with data of many shapes
(a folder of mixed formats, data that comes split with copies across splits, text in other
encodings, JSON Lines joined with `cat`) runs it."""

import json
import shutil

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus

TINY = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--steps", "1", "--quiet"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "alpha", "beta"]


def paragraph(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)) + f" {i}"


def text_folder(folder, count=100):
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:03d}.txt").write_text(f"{paragraph(i)}\n{paragraph(i + 1)}\n")
    return folder


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lowbit: warning:")]


def test_a_folder_names_the_text_files_it_does_not_read(tmp_path, capsys):
    """A folder of .txt files and a .jsonl (or .rst) beside them trained on the .txt ones alone,
    without a word: the user believed their JSONL records were in the run."""
    data = text_folder(tmp_path / "data")
    (data / "extra.jsonl").write_text(json.dumps({"text": paragraph(500)}) + "\n")
    (data / "notes.rst").write_text(paragraph(501))
    (data / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # no text: not named
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--out", str(out)]) == 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert "2 text files not read (extra.jsonl, notes.rst)" in line
    assert "photo.png" not in line and "fix:" in line and "/**/*" in line


def test_a_folder_of_only_what_it_reads_warns_of_nothing(tmp_path, capsys):
    data = text_folder(tmp_path / "data")
    (data / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert load_corpus(str(data)).warnings == ()
    assert warnings_of(capsys.readouterr().err) == []


def test_validation_documents_copied_from_train_are_counted(tmp_path, capsys):
    """The same files in train/ and valid/ (data that comes split, kept as given): the
    validation loss was measured on training text, and nothing said so."""
    data = tmp_path / "data"
    text_folder(data / "train", count=60)
    (data / "valid").mkdir()
    for i in range(3):  # copies, one of them saved with Windows line ends
        shutil.copy(data / "train" / f"{i:03d}.txt", data / "valid" / f"{i:03d}.txt")
    (data / "valid" / "002.txt").write_bytes(
        (data / "train" / "002.txt").read_bytes().replace(b"\n", b"\r\n")
    )
    for i in range(3, 10):
        (data / "valid" / f"own{i}.txt").write_text(paragraph(1000 + i))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--out", str(out)]) == 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert "3 of 10 validation documents have the text of a training document" in line
    assert "(valid/000.txt is train/000.txt)" in line and "fix:" in line
    corpus = load_corpus(str(data))
    assert len(corpus.split("validation")) == 10  # the splits are kept


def test_short_paragraphs_that_recur_are_not_counted_as_shared(tmp_path):
    """A scene break between chapters recurs in any book: no warning for it."""
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"{paragraph(i)}\n\n* * *" for i in range(200)))
    assert load_corpus(str(book)).warnings == ()


@pytest.mark.parametrize(
    ("encoding", "named"),
    [("utf-16", "UTF-16LE text, not UTF-8"), ("utf-16-le", "holds NUL bytes (byte 1)")],
)
def test_utf16_text_is_named_as_such(tmp_path, capsys, encoding, named):
    """Windows Notepad's "Unicode" text: with its byte-order mark the message said only "not
    UTF-8 text (byte 0)"; without one, ASCII decoded as UTF-8 with a NUL after each letter and
    trained so, without a word."""
    data = tmp_path / "notes.txt"
    data.write_bytes("\n\n".join(paragraph(i) for i in range(150)).encode(encoding))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "fix: convert it to UTF-8" in err
    assert not out.exists()


def test_jsonl_files_joined_with_cat_keep_their_records(tmp_path):
    """`cat a.jsonl b.jsonl` of two files a Windows editor saved puts a byte-order mark at the
    start of b's first line, which was refused as invalid JSON "(decode using utf-8-sig)"."""
    part = "\n".join(json.dumps({"text": paragraph(i)}) for i in range(50)) + "\n"
    data = tmp_path / "all.jsonl"
    data.write_bytes(("\ufeff" + part + "\ufeff" + part).encode())
    corpus = load_corpus(str(data))
    texts = [doc.text for docs in corpus.splits.values() for doc in docs]
    assert len(texts) == 100 and not any("\ufeff" in t for t in texts)


def test_a_folder_of_blank_files_is_no_text(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"{i}.txt").write_text("  \n\t\n\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}: all 5 files it reads hold only whitespace" in err
