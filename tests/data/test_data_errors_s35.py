"""What a data error's fix says (session 35): a file in another encoding than UTF-8 gets the
iconv command that converts it, and a file of one huge line (text8) the command that cuts it into
paragraphs; both fixes, followed, give data lowbit reads."""

import random
import shlex
import subprocess

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus
from lowbit.errors import UsageError

TINY = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--steps", "1", "--quiet"]
WORDS = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "first", "used", "against"]


def _error(capsys, data, tmp_path) -> str:
    """`lowbit train --data DATA`'s one error line; it wrote nothing."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists(), err
    return err.strip()


def test_a_latin1_file_gets_the_iconv_command_and_its_byte(tmp_path, capsys):
    """ "not UTF-8 text (byte 3); fix: convert it to UTF-8" said neither how nor which byte of
    which line; cp1252 is offered as a guess, with the character the byte is there."""
    data = tmp_path / "notes.txt"
    data.write_bytes(b"plain\ncaf\xe9 au lait\n")
    err = _error(capsys, data, tmp_path)
    converted = tmp_path / "notes.utf8.txt"
    assert err == (
        f"lowbit: error: {data}: not UTF-8 text (byte 0xe9 at offset 9, line 2); fix: convert it "
        "from the encoding it was written in, cp1252 (Windows' Latin-1) if 'é' belongs there (a "
        f"guess): iconv -f CP1252 -t UTF-8 {data} > {converted}, and use that file in its place"
    )
    command = err.split(": iconv ", 1)[1].split(",", 1)[0]
    subprocess.run(f"iconv {command}", shell=True, check=True)
    assert converted.read_text(encoding="utf-8") == "plain\ncafé au lait\n"


def test_no_encoding_is_guessed_where_cp1252_cannot_be_it(tmp_path, capsys):
    """0x81 is no cp1252 character (nor text in Latin-1): the command names no encoding."""
    data = tmp_path / "notes.txt"
    data.write_bytes(b"plain\nab\x81c\n")
    err = _error(capsys, data, tmp_path)
    assert "(byte 0x81 at offset 8, line 2)" in err
    assert f"(file -i {data} may tell which): iconv -f ENCODING -t UTF-8 {data} >" in err
    assert "cp1252" not in err.lower()


def test_a_file_mixing_utf8_and_latin1_is_not_sent_to_iconv(tmp_path, capsys):
    """Converted whole from cp1252, its UTF-8 text before the byte would turn into mojibake."""
    data = tmp_path / "notes.txt"
    data.write_bytes("café\n".encode() + b"caf\xe9\n")
    err = _error(capsys, data, tmp_path)
    assert err.endswith(
        "(byte 0xe9 at offset 9, line 2) after UTF-8 text: the file mixes encodings; fix: retype "
        "line 2's text (and any other line refused so) in UTF-8"
    )


def test_a_file_of_one_huge_line_gets_a_fix_that_suits_it(tmp_path, capsys):
    """A text8-style file (one line, no paragraph breaks) is one document: "the validation split
    is empty ... paragraphs of one text file (a blank line between them)" did not say how to get
    paragraphs out of a file without line breaks. The fix's command, run, gives data that trains."""
    data = tmp_path / "text8"
    words = random.Random(0).choices(WORDS, k=20000)  # no paragraph cut from it twice
    data.write_text(" " + " ".join(words))
    err = _error(capsys, data, tmp_path)
    size = data.stat().st_size
    assert err.startswith(
        f"lowbit: error: {data}: one line of {size:,} bytes without line breaks (as text8 is): "
        "one paragraph, one document, so the validation split is empty; fix: cut it into "
        f"paragraphs at spaces, fold -s -w {size // 500} {data} | sed G > "
    ), err
    command = err.split("paragraphs at spaces, ", 1)[1].split(" (lines of", 1)[0]
    subprocess.run(command, shell=True, check=True)
    out = shlex.split(err.rsplit("then --data ", 1)[1])[0]
    corpus = load_corpus(out)
    assert all(corpus.split(name) for name in ("train", "validation", "test"))
    with open(out, encoding="utf-8") as paragraphs:  # the text as it was, cut at spaces
        assert paragraphs.read().replace("\n", "") == data.read_text()


def test_a_short_one_line_file_is_told_to_hold_more_text(tmp_path):
    """Cut into paragraphs, a line of a few hundred bytes still leaves a split empty: its fix
    stays "provide more documents"."""
    data = tmp_path / "note.txt"
    data.write_text(" ".join(WORDS * 10) + "\n")
    corpus = load_corpus(str(data))
    empty = next(name for name, docs in corpus.splits.items() if not docs)
    with pytest.raises(UsageError, match=f"the {empty} split is empty .* provide more documents"):
        corpus.split(empty)
