"""Session 40: a user's text files that are compressed without their extension, or UTF-16 text
beyond ASCII, through `lowbit train --data`: each refused with a command that works as printed."""

import bz2
import gzip
import json
import lzma
import re
import subprocess
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus
from lowbit.errors import UsageError

PARAGRAPHS = 40
TEXTS = {
    "german": "Grüße aus München, übermäßig schöne Straßen",
    "greek": "Καλημέρα κόσμε, αυτό είναι ελληνικό κείμενο",
    "cjk": "你好，世界。这是中文文本，用于测试。",
}
COMPRESS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}  # zstd below: the standard library of Python 3.11 does not write it


def _text(language="german") -> str:
    return "\n\n".join(f"{i}. {TEXTS[language]}" for i in range(PARAGRAPHS)) + "\n"


def _refusal(path, capsys) -> str:
    argv = ["train", "--data", str(path), "--model", "nano", "--out", str(path.parent / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (path.parent / "r").exists()
    return err


def _run_fix(message: str, fix: str) -> None:
    """Run the command of ``message``'s ``fix: {fix}: COMMAND, and use that file in its place``."""
    command = re.search(rf"; fix: {re.escape(fix)}: (.*), and use that file in its place", message)
    assert command, message
    subprocess.run(["bash", "-c", command.group(1)], check=True, capture_output=True)


def _documents(path) -> list[str]:
    return [d.text.strip() for docs in load_corpus(str(path)).splits.values() for d in docs]


@pytest.mark.parametrize("name", ["notes.txt", "notes"])
@pytest.mark.parametrize("kind", list(COMPRESS))
def test_a_compressed_file_without_its_extension_gets_a_command_that_unpacks_it(
    tmp_path, capsys, kind, name
):
    """A gzipped ``notes.txt`` was "fix: ... gunzip -k notes.txt", which gunzip refuses
    ("unknown suffix -- ignored"), as unxz and unzstd do."""
    path = tmp_path / name
    path.write_bytes(COMPRESS[kind](_text().encode()))
    err = _refusal(path, capsys)
    assert err.startswith(f"lowbit: error: {path}: {kind}-compressed, not text; "), err
    _run_fix(err, "decompress it (lowbit reads plain UTF-8 files)")
    unpacked = tmp_path / ("notes.unpacked.txt" if name == "notes.txt" else "notes.unpacked")
    assert len(_documents(unpacked)) == PARAGRAPHS


def test_a_zstd_file_without_its_extension_gets_unzstd_to_standard_output(tmp_path, capsys):
    """unzstd refuses a name without .zst as gunzip does; its -c writes to standard output."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 4)  # zstd's magic number first
    err = _refusal(path, capsys)
    unpacked = tmp_path / "notes.unpacked.txt"
    assert err == (
        f"lowbit: error: {path}: zstd-compressed, not text; fix: decompress it (lowbit reads plain"
        f" UTF-8 files): unzstd -c {path} > {unpacked}, and use that file in its place"
    )


def test_a_folders_compressed_file_without_its_extension_gets_the_command_too(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(_text())
    (data / "z.txt").write_bytes(gzip.compress(_text("greek").encode()))
    with pytest.raises(UsageError) as caught:
        load_corpus(str(data))
    message = str(caught.value)
    assert message.endswith("and use that file in its place; or remove it"), message
    _run_fix(message, "decompress it (lowbit reads plain UTF-8 files)")
    assert (data / "z.unpacked.txt").read_text() == _text("greek")


def _utf16(text: str, order: str, mark: bool) -> bytes:
    return (b"\xff\xfe" if order == "le" else b"\xfe\xff") * mark + text.encode(f"utf-16-{order}")


@pytest.mark.parametrize("mark", [False, True], ids=["no-mark", "mark"])
@pytest.mark.parametrize("order", ["le", "be"])
@pytest.mark.parametrize("language", list(TEXTS))
def test_utf16_text_is_refused_with_the_iconv_command_that_converts_it(
    tmp_path, capsys, language, order, mark
):
    """UTF-16 text beyond ASCII without a byte-order mark got "cp1252 (Windows' Latin-1) if 'ü'
    belongs there (a guess): iconv -f CP1252", whose file kept a NUL after each letter; with a
    mark the fix named no file ("iconv -f UTF-16LE -t UTF-8")."""
    path = tmp_path / "notes.txt"
    path.write_bytes(_utf16(_text(language), order, mark))
    err = _refusal(path, capsys)
    encoding = f"UTF-16{order.upper()}"
    assert f"{encoding} text" in err and "CP1252" not in err, err
    _run_fix(err, "convert it to UTF-8")
    converted = tmp_path / "notes.utf8.txt"
    assert converted.read_bytes() == _text(language).encode()  # no mark left in it
    assert len(_documents(converted)) == PARAGRAPHS


def test_utf16_text_in_a_glob_is_named_with_its_byte_order(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(_text())
    (data / "b.txt").write_bytes(_utf16(_text("greek"), "be", mark=False))
    with pytest.raises(UsageError) as caught:
        load_corpus(f"{data}/*.txt")
    message = str(caught.value)
    assert message.startswith(f"{data / 'b.txt'}: holds NUL bytes (byte 0): UTF-16BE text "), (
        message
    )
    assert message.endswith("and use that file in its place; or remove it"), message


# Review R1 of the above (session 40)


def test_a_pyc_file_in_a_glob_is_left_out_as_binary(tmp_path):
    """The ``.pyc`` file of a module with a long docstring, its NULs deleted, read as UTF-8 text
    with a few replacement characters: a glob stopped at "not UTF-8 text ...; iconv -f CP1252"
    where it had left the file out (README: binary files are left out)."""
    import py_compile

    module = tmp_path / "m.py"
    module.write_text('"""' + "Explains. " * 250 + '"""\nX = 1\n')
    pyc = Path(py_compile.compile(str(module)))
    corpus = load_corpus(f"{tmp_path}/**/*")
    assert [d.text for docs in corpus.splits.values() for d in docs]
    assert any(pyc.name in line and "binary" in line for line in corpus.warnings), corpus.warnings


def test_a_cp1252_log_padded_with_nuls_gets_one_command_for_both(tmp_path, capsys):
    """A cp1252 log padded with NULs by a crash was "a binary file ...; fix: remove it"."""
    path = tmp_path / "server.log"
    path.write_bytes(_text().encode("cp1252") + b"\0" * 2000)
    err = _refusal(path, capsys)
    assert "cp1252" in err and "NUL bytes" in err, err
    _run_fix(err, re.search(r"; fix: (.*?): ", err).group(1))
    assert (tmp_path / "server.utf8.log").read_text() == _text()


@pytest.mark.parametrize("name", ["d.jsonl.gzip", "d.jsonl.bz2"])
def test_a_compressed_file_unpacks_to_its_own_suffix_and_overwrites_nothing(tmp_path, name):
    """``d.jsonl.zstd`` got ``unzstd -c d.jsonl.zstd > d.jsonl.unpacked.zstd``, which loaded as
    one raw paragraph; and a file of the name the fix writes to was overwritten."""
    records = "".join(json.dumps({"text": f"record {i} of the set"}) + "\n" for i in range(40))
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(gzip.compress(records.encode()))  # gzip, whatever the name says
    (data / "d.unpacked.jsonl").write_text('{"text": "kept"}\n')
    with pytest.raises(UsageError) as caught:
        load_corpus(str(data / name))
    _run_fix(str(caught.value), "decompress it (lowbit reads plain UTF-8 files)")
    assert (data / "d.unpacked.jsonl").read_text() == '{"text": "kept"}\n'
    assert len(_documents(data / "d.unpacked.2.jsonl")) == 40


# Devanagari (U+0900): its letters' high byte is 0x09, a tab
HINDI = "नमस्ते दुनिया, यह एक पाठ है।"


@pytest.mark.parametrize("order", ["le", "be"])
def test_utf16_text_of_hindi_gets_iconv(tmp_path, capsys, order):
    """Its letters' high bytes are white space, so with the NULs of the spaces and digits
    deleted the text read as ASCII: "tr -d '\\000'", whose file loaded as garbage."""
    text = "\n\n".join(f"{i}. {HINDI}" for i in range(PARAGRAPHS)) + "\n"
    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode(f"utf-16-{order}"))
    err = _refusal(path, capsys)
    assert f"UTF-16{order.upper()} text" in err, err
    _run_fix(err, "convert it to UTF-8")
    assert (tmp_path / "notes.utf8.txt").read_text() == text


@pytest.mark.parametrize("width", [None, 15], ids=["find-print0", "even-length"])
def test_nul_separated_records_become_lines_not_one_glued_line(tmp_path, capsys, width):
    """``find -print0``'s output got ``tr -d '\\000'``, which glued its records (``r0r1r2``);
    records of an even length with their NUL (``printf '%015x\\0'``) were called UTF-16LE text,
    their NULs all at odd offsets (review R5), and iconv made CJK of them."""
    path = tmp_path / "files.txt"
    records = [f"./src/dir{i}/file_{i}.py" for i in range(300)]
    if width:
        records = [f"{i * 7919:0{width}x}" for i in range(300)]
    path.write_bytes(b"\0".join(r.encode() for r in records) + b"\0")
    err = _refusal(path, capsys)
    command = re.search(r"\((tr .*)\) and use that file in its place$", err)
    assert command, err
    subprocess.run(["bash", "-c", command.group(1)], check=True)
    assert (tmp_path / "files.clean.txt").read_text().split("\n") == [*records, ""]
