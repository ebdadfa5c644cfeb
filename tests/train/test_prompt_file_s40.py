"""Session 40: `lowbit generate --prompt-file` reads a file with a data file's checks: UTF-16
without a byte-order mark was a prompt with a NUL between its letters, and a cp1252 file was
told "iconv -f latin1". The prompt is read before the run is, so no run is needed."""

import pytest

from lowbit.cli import main


def refusal(tmp_path, capsys, data: bytes) -> str:
    path = tmp_path / "prompt.txt"
    path.write_bytes(data)
    assert main(["generate", str(tmp_path / "run"), "--prompt-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"lowbit: error: --prompt-file {path}: "), captured.err
    assert "remove it" not in captured.err  # the prompt file is all the prompt
    return captured.err


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_prompt_file_without_a_byte_order_mark_is_refused(tmp_path, capsys, encoding):
    err = refusal(tmp_path, capsys, "Grüße aus Köln\n".encode(encoding))
    named = encoding.upper().replace("-LE", "LE").replace("-BE", "BE")
    assert f"{named} text without a byte-order mark" in err, err
    assert f"iconv -f {named} -t UTF-8 " in err, err


def test_a_cp1252_prompt_file_gets_the_cp1252_conversion(tmp_path, capsys):
    err = refusal(tmp_path, capsys, "def caf\u00e9(): return 1\n".encode("cp1252"))
    assert "not UTF-8 text (byte 0xe9 at offset 7, line 1)" in err, err
    assert "iconv -f CP1252 -t UTF-8" in err and "latin1" not in err, err
