"""Session 41: UTF-16 text without a byte-order mark that holds no NUL byte (one line of Hindi,
Russian or Chinese: no ASCII, so no high byte is NUL), through `lowbit train --data`; and
`lowbit generate --prompt-file -`, which read standard input with older checks than a file's."""

import gzip
import io
import re
import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus, load_texts
from lowbit.errors import UsageError
from tests.data.test_encodings_s40 import _refusal


def _converted(err: str) -> str:
    """The text that the fix's iconv command of ``err`` writes."""
    command = re.search(r": (iconv .*), and use that file in its place$", err)
    assert command, err
    subprocess.run(["bash", "-c", command.group(1)], check=True, capture_output=True)
    out = command.group(1).rsplit("> ", 1)[1].strip("'")
    with open(out, encoding="utf-8") as file:
        return file.read()


# Devanagari's letters have high byte 0x09 (a tab), Cyrillic's 0x04: without spaces the UTF-16
# text is valid UTF-8 (ASCII with a control byte between its letters) and was trained on so
@pytest.mark.parametrize("text", ["नमस्ते", "नमस्ते दुनिया यह हिंदी है", "Привет"])
@pytest.mark.parametrize("order", ["le", "be"])
def test_one_line_of_utf16_without_nul_bytes_is_refused_with_iconv(tmp_path, capsys, text, order):
    """The second line has a few spaces (few NULs): "delete the NULs" (tr -d), as a log's
    padding, whose file read as ASCII between tabs."""
    path = tmp_path / "line.txt"
    path.write_bytes(text.encode(f"utf-16-{order}"))
    err = _refusal(path, capsys)
    named = f"UTF-16{order.upper()} text without a byte-order mark"  # its NULs tell it
    if " " not in text:  # a guess, showing the UTF-16 reading
        named = f"UTF-16{order.upper()} without a byte-order mark if it reads {text!r} (a guess)"
    assert named in err, err
    assert _converted(err) == text


def test_only_the_utf16_file_of_a_folder_is_refused(tmp_path):
    """What the UTF-16 evidence must not take, read before it: one character a line (a character
    vocabulary) and single-character fields between tabs, each line with its end."""
    (tmp_path / "a_vocab.txt").write_text("".join(f"{c}\n" for c in "abcdefghij" * 30))
    (tmp_path / "b_cells.txt").write_text("a\tb\tc\td\n" * 40)
    (tmp_path / "c_hindi.txt").write_bytes("नमस्ते".encode("utf-16-le"))
    with pytest.raises(UsageError) as caught:
        load_corpus(str(tmp_path))
    assert str(caught.value).startswith(f"{tmp_path / 'c_hindi.txt'}: "), caught.value
    assert "UTF-16LE without a byte-order mark if it reads 'नमस्ते'" in str(caught.value)


@pytest.mark.parametrize(
    "text, encoding", [("中文", "UTF-16LE"), ("日本語のテキストです。", "UTF-16BE")]
)
def test_one_line_of_cjk_in_utf16_without_nul_bytes_gets_the_utf16_guess(
    tmp_path, capsys, text, encoding
):
    """It was offered cp1252 ("if '‡' belongs there"), whose conversion is mojibake. A cp1252
    word gets no UTF-16 guess, and Shift-JIS text, which reads as ideographs in UTF-16BE, gets
    Shift-JIS's first."""
    path = tmp_path / "line.txt"
    path.write_bytes(text.encode(encoding))
    err = _refusal(path, capsys)
    assert f"{encoding} without a byte-order mark if it reads {text!r} (a guess)" in err, err
    assert _converted(err) == text
    path.write_bytes("Café".encode("cp1252"))
    err = _refusal(path, capsys)
    assert "cp1252 (Windows' Latin-1) if 'é' belongs there" in err, err
    path.write_bytes("日本語のテキストです。".encode("shift_jis"))
    assert _converted(_refusal(path, capsys)) == "日本語のテキストです。"


def _stdin_refusal(tmp_path, capsys, monkeypatch, data: bytes) -> str:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["generate", str(tmp_path / "run"), "--prompt-file", "-"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("lowbit: error: --prompt-file standard input: "), captured.err
    return captured.err.strip()


@pytest.mark.parametrize(
    "data, fix",
    [
        ("Grüße aus Köln\n".encode("utf-16-le"), "iconv -f UTF-16LE -t UTF-8"),
        ("नमस्ते".encode("utf-16-le"), "iconv -f UTF-16LE -t UTF-8"),
        (gzip.compress(b"def hello():\n"), "gunzip -c"),
        (b"def f():\n\0\0\0\0\0\0\0\0", "tr -d '\\000'"),
    ],
    ids=["utf16", "utf16-no-nul", "gzip", "nul-padding"],
)
def test_a_prompt_on_standard_input_gets_a_prompt_files_checks(
    tmp_path, capsys, monkeypatch, data, fix
):
    """UTF-16 without a byte-order mark on standard input was a prompt with a NUL between its
    letters, and a gzipped prompt was told "iconv -f latin1"; each fix is a command to pipe the
    input through, as no file can be named."""
    err = _stdin_refusal(tmp_path, capsys, monkeypatch, data)
    assert f"pipe it through {fix}" in err, err
    assert "latin1" not in err and "> " not in err, err
    command = re.search(r"pipe it through (.*?)\)?$", err).group(1)
    piped = subprocess.run(["bash", "-c", command], input=data, capture_output=True, check=True)
    assert b"\0" not in piped.stdout and piped.stdout.decode("utf-8").strip()


def test_an_archive_on_standard_input_is_refused_without_a_file_command(
    tmp_path, capsys, monkeypatch
):
    """A tar archive's fix, ``tar -xf FILE``, named "standard input" as the file."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("prompt.txt")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"def "))
    err = _stdin_refusal(tmp_path, capsys, monkeypatch, buffer.getvalue())
    assert err.endswith("a tar archive, not text; fix: give the text itself, in UTF-8"), err


# Review R3 of the UTF-16 guesses: short cp1252 text, white space and tables read as UTF-16
# without NULs, a large cp1252 file's refusal, and legacy East Asian encodings.


@pytest.mark.parametrize("text", ["It’s", "“Hi”", "50°F", "€100", "’tis", "…and"])
def test_short_cp1252_text_keeps_its_cp1252_guess(tmp_path, capsys, text):
    """A prompt file or one-liner with a curly quote, a dash, a degree or euro sign read as two
    ideographs in UTF-16 and got that guess alone ('瑉玒' for It’s)."""
    path = tmp_path / "line.txt"
    path.write_bytes(text.encode("cp1252"))
    err = _refusal(path, capsys)
    assert "fix: convert it from the encoding it was written in, cp1252 (Windows' Latin-1)" in err
    assert _converted(err) == text


@pytest.mark.parametrize(
    "data", [b"\t\t\t\t", b"a\tb\t", b"\tx\ty\tz", b"a\x0bb\x0b", b"\x1b[\x1b[", b"x\ty\tz\tw\t"]
)
def test_utf8_with_control_bytes_between_its_characters_is_read(tmp_path, data):
    """Tabs alone, one-letter cells between tabs, vertical tabs and escape codes were refused as
    UTF-16 text (stated as fact), and a folder's file of tabs stopped the whole run."""
    (tmp_path / "a.txt").write_text("some text to train on\n" * 20)
    (tmp_path / "b.txt").write_bytes(data)
    documents = {d.name: d.text for d in load_texts(str(tmp_path))}
    assert documents["b.txt"] == data.decode("utf-8")


@pytest.mark.parametrize(
    "text, encoding, named",
    [
        ("東京都庁", "shift_jis", "SHIFT_JIS"),
        ("台灣", "big5", "BIG5"),
        ("สวัสดี", "cp874", "CP874"),
        ("한국", "euc_kr", "EUC-KR"),
    ],
)
def test_legacy_east_asian_text_gets_its_own_guess(tmp_path, capsys, text, encoding, named):
    """Shift-JIS kanji read as ideographs in UTF-16BE ('鎌讞鍳銡'), and short Big5, Thai and
    EUC-KR text as Hangul in UTF-16LE, and that guess came alone: the encoding that reads as its
    script is offered too, and converts it when named to iconv."""
    path = tmp_path / "line.txt"
    path.write_bytes(text.encode(encoding))
    err = _refusal(path, capsys)
    assert f"{named} if it reads {text!r}" in err, err
    assert _converted(re.sub(r"iconv -f \S+", f"iconv -f {named}", err)) == text
