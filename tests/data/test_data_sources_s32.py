"""Session 32: where `lowbit train` finds its text: the default standard-library corpus on a
Python that ships no sources, links to nothing and folders that cannot be listed (in a folder or
glob of text, as the data path, in a CoNLL folder), a Parquet file, and a BPE vocabulary size far
beyond what the text holds."""

import os
import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.data import corpus, load_corpus, load_texts, train_bpe
from lowbit.data.conll import conll_folder_files
from lowbit.errors import UsageError
from tests.data.test_data_hunt_s28 import TINY
from tests.data.test_data_hunt_s29 import paragraph, text_folder, warnings_of


@pytest.fixture
def compiled_only_stdlib(tmp_path, monkeypatch):
    """A standard library of compiled files only, as some interpreters ship it."""
    root = tmp_path / "lib" / "python3.13"
    (root / "__pycache__").mkdir(parents=True)
    (root / "__pycache__" / "os.cpython-313.pyc").write_bytes(b"\xf3\r\r\n" + bytes(12))
    monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
    corpus.stdlib_documents.cache_clear()  # documents read from the real one earlier
    yield root
    corpus.stdlib_documents.cache_clear()


@pytest.mark.parametrize("task", ["causal-lm", "token-classification"])
def test_a_python_without_stdlib_sources_is_named_with_the_data_flag(
    compiled_only_stdlib, tmp_path, capsys, task
):
    """With no ``.py`` sources the default run stopped at "the train split is empty (train 0,
    validation 0, test 0 documents); fix: provide more documents", for data never given."""
    out = tmp_path / "run"
    argv = ["train", "--task", task, "--steps", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()
    assert f"{compiled_only_stdlib}: no Python standard library sources" in err
    assert "fix: give your own data with --data" in err


def test_a_link_to_nothing_in_the_data_is_warned_of(tmp_path, capsys):
    """A folder of links into a disk not mounted (one to a file, one to a sub-corpus) trained on
    the files beside them without a word, a folder and its glob alike."""
    data = text_folder(tmp_path / "data")
    os.symlink(tmp_path / "unmounted" / "book.txt", data / "book.txt")
    os.symlink(tmp_path / "unmounted" / "wiki", data / "wiki")
    os.symlink(tmp_path / "unmounted" / "weights.bin", data / "weights.bin")  # not read anyway
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--out", str(out)]) == 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert f"{data}: 2 entries not read (book.txt: a link to {tmp_path}/unmounted/book.txt" in line
    assert f"wiki: a link to {tmp_path}/unmounted/wiki, which does not exist" in line
    assert "fix: restore the links' targets" in line
    pattern = f"{data}/**/*.txt"
    assert len(load_corpus(pattern).splits["train"]) > 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert line.startswith(f"lowbit: warning: {pattern}: 2 entries not read (book.txt: a link")


def test_a_data_path_that_links_to_nothing_names_its_target(tmp_path, capsys):
    """``--data corpus.txt``, a link whose target is gone, was "no such file, folder or glob;
    fix: check the data path" for a path that ``ls`` lists."""
    link = tmp_path / "corpus.txt"
    os.symlink(tmp_path / "unmounted" / "corpus.txt", link)
    out = tmp_path / "run"
    assert main(["train", "--data", str(link), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    assert f"{link}: a link to {tmp_path}/unmounted/corpus.txt, which does not exist" in err


def test_a_folder_that_cannot_be_listed_is_warned_of_or_refused(tmp_path, capsys, monkeypatch):
    """A sub-folder without read permission was passed over as empty; data whose every folder is
    such stopped at "no text found; fix: point at UTF-8 .txt/.md/.py files", which it holds."""
    data = text_folder(tmp_path / "data")
    (data / "private").mkdir()
    (data / "private" / "notes.txt").write_text(paragraph(1000))
    listdir, blocked = os.listdir, {str(data / "private")}

    def denied(path):  # the tests run as root, whom permissions do not stop
        if os.fspath(path) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", denied)
    assert len(load_corpus(str(data)).splits["train"]) > 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert f"{data}: 1 entry not read (private/: cannot list it: Permission denied)" in line
    blocked.add(str(data))
    with pytest.raises(UsageError, match=f"{data}: no text read, 1 entry not read .*Permission"):
        load_texts(data)
    # a disk's root holds fsck's root-only lost+found: no data, and no warning on every run
    (data / "lost+found").mkdir()
    blocked.discard(str(data))
    blocked.add(str(data / "lost+found"))
    blocked.discard(str(data / "private"))
    load_corpus(str(data))
    assert not warnings_of(capsys.readouterr().err)


def test_a_vocab_size_beyond_the_text_learns_what_it_holds(tmp_path, capsys):
    """The BPE trainer reserved memory for the size asked: ``--vocab-size`` past 2**64 raised an
    OverflowError traceback."""
    data = text_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--tokenizer", "bpe", "--vocab-size", str(2**64)]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"not the --vocab-size {2**64} asked" in err and "Traceback" not in err


def test_a_mistyped_huge_vocab_size_does_not_abort_the_process():
    """``--vocab-size 1000000000`` aborted Python from Rust ("memory allocation of 70866960400
    bytes failed"), a core dump and no message; run apart so that the abort cannot take the
    test session with it."""
    code = (
        "from lowbit.data import train_bpe\n"
        "a = train_bpe(['hello world, hello there'] * 3, 10**9)\n"
        "b = train_bpe(['hello world, hello there'] * 3, 1000)\n"
        "assert a._tok.to_str() == b._tok.to_str()\n"
        "print(a.vocab_size)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert 257 < int(done.stdout) < 300


def test_the_capped_vocab_size_learns_the_same_merges():
    texts = [paragraph(i) for i in range(20)]
    assert train_bpe(texts, 10**6)._tok.to_str() == train_bpe(texts, 5000)._tok.to_str()


def parquet_file(path):
    """The bytes of a small Parquet file as the Hub serves them: magic, compressed pages (binary,
    NUL bytes among them), a Thrift footer, its length, magic."""
    pages = bytes(range(256)) * 8
    footer = b"\x15\x04\x19\x2c\x48\x06schema\x15\x02\x00\x15\x0c\x25\x02\x18\x04text\x00"
    path.write_bytes(b"PAR1" + pages + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    return path


@pytest.mark.parametrize("as_glob", [False, True])
def test_a_parquet_file_is_named_with_the_command_that_writes_json_lines(tmp_path, as_glob):
    """A dataset downloaded from the Hugging Face Hub (``train-00000-of-00001.parquet``) was
    "not UTF-8 text (byte 4); fix: convert it to UTF-8", and in a glob a binary file that holds
    no text."""
    path = parquet_file(tmp_path / "train-00000-of-00001.parquet")
    spec = f"{tmp_path}/*.parquet" if as_glob else str(path)
    with pytest.raises(UsageError) as caught:
        load_corpus(spec)
    message = str(caught.value)
    assert message.startswith(f"{path}: a Parquet file, not text; fix: write its records as JSON")
    # the paths as given, so that the command works from where the user typed --data
    assert f"read_parquet({str(path)!r}).to_json({str(path.with_suffix('.jsonl'))!r}, " in message
    assert "orient='records', lines=True" in message


def test_a_conll_split_file_that_links_to_nothing_is_named(tmp_path, capsys):
    """A CoNLL folder whose ``test.txt`` links to a disk not mounted was "no test file among
    dev.txt, train.txt; fix: rename the split files"; a second train file's such link was left
    out without a word."""
    folder = tmp_path / "conll"
    folder.mkdir()
    for name in ("train.txt", "dev.txt"):
        (folder / name).write_text("Paris B-LOC\nis O\nnice O\n")
    os.symlink(tmp_path / "unmounted" / "test.txt", folder / "test.txt")
    out = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--data", str(folder), "--steps", "1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    assert f"{folder}/test.txt: a link to {tmp_path}/unmounted/test.txt, which does not" in err
    (folder / "test.txt").unlink()
    (folder / "test.txt").write_text("Rome B-LOC\n")
    os.symlink(tmp_path / "unmounted" / "train2.txt", folder / "train-2.txt")
    with pytest.raises(UsageError, match=r"train-2\.txt: a link to .*fix: restore its target"):
        conll_folder_files(folder)
