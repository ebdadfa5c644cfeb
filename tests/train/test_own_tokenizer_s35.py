"""Session 35: a user's own tokenizer folder given to ``--tokenizer`` is refused with where it goes
(a ``--model`` folder, which brings its own tokenizer), not only "unknown tokenizer"."""

import pytest

from lowbit.cli import main


@pytest.mark.parametrize("given", ["folder", "tokenizer.json"])
def test_a_tokenizer_folder_is_refused_with_the_model_folder_it_belongs_in(tmp_path, capsys, given):
    """``--tokenizer mytok`` (a folder saved by the tokenizers library) read "unknown tokenizer
    'mytok'; valid tokenizers: byte, bpe": no fix, and nothing said that a tokenizer of one's own
    is read from the --model folder."""
    folder = tmp_path / "mytok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    path = folder if given == "folder" else folder / given
    argv = ["train", "--tokenizer", str(path), "--model", "nano", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lowbit: error: --tokenizer {path}: ")
    assert "takes byte or bpe" in err and "fix: " in err and "--model DIR" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_tokenizer_name_still_lists_the_valid_ones(tmp_path, capsys):
    argv = ["train", "--tokenizer", "wordpiece", "--model", "nano", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "unknown tokenizer 'wordpiece'; valid tokenizers: byte, bpe" in capsys.readouterr().err
