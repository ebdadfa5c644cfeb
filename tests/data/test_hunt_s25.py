"""Session 25's hunt in data loading: user text, CoNLL files, tokenizers and vocabularies."""

import json
import os
import subprocess
import sys

import pytest

from lowbit.data import load_texts
from lowbit.errors import UsageError


def test_a_word_vocabulary_is_utf8_whatever_the_locale(tmp_path):
    """WordVocab wrote and read vocab.json in the locale's encoding: a token-classification run
    on accented or CJK words stopped with a UnicodeEncodeError when it saved its artifacts under
    an ASCII or cp1252 locale, and a vocabulary written in one locale read as other words in
    another."""
    words = ["naïve", "東京", "Zürich"]
    script = (
        "import sys\n"
        "from lowbit.data import WordVocab\n"
        f"vocab = WordVocab([*WordVocab.SPECIALS, *{words!a}])\n"
        "vocab.save(sys.argv[1])\n"
        "print(WordVocab.load(sys.argv[1]).words == vocab.words)\n"
    )
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    path = tmp_path / "vocab.json"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=ascii_locale, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "True"
    assert json.loads(path.read_text(encoding="utf-8"))["words"][-3:] == words


def test_a_pipe_as_data_is_refused_as_a_pipe_not_as_a_missing_path(tmp_path):
    """``--data <(zcat corpus.txt.gz)`` (the shell's /dev/fd/63) was refused as "no such file,
    folder or glob; fix: check the data path", a path that is there."""
    fifo = tmp_path / "text"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file or folder but a pipe or device"):
        load_texts(fifo)


def test_a_word_that_spells_a_special_token_is_no_special_token(tmp_path):
    """A CoNLL word "[PAD]" took a second vocabulary entry that replaced the padding id: the word
    was masked from attention while its tag was trained, and padding no longer used the id the
    encoder's embedding keeps for it (0); a word "[SEP]" read as the sentence separator."""
    from lowbit.data import Sentence, WordVocab

    sentences = [Sentence(["[PAD]", "x", "[SEP]"], ["O", "B-A", "O"])] * 3
    vocab = WordVocab.build(sentences)
    vocab.save(tmp_path / "vocab.json")
    for loaded in (vocab, WordVocab.load(tmp_path / "vocab.json")):
        encoded = loaded.encode(sentences[:1], {"O": 0, "B-A": 1}, max_len=6)
        cls, sep, unknown = (loaded.ids[w] for w in ("[CLS]", "[SEP]", "[UNK]"))
        assert loaded.pad_id == 0
        row = [cls, unknown, loaded.ids["x"], unknown, sep, loaded.pad_id]
        assert encoded["input_ids"][0].tolist() == row
        assert encoded["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_data_path_is_refused_by_the_library_too(empty, tmp_path, monkeypatch):
    """`load_texts("")` read the current folder (the CLI refuses ``--data ""`` itself)."""
    from lowbit.data import load_corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("text in the current folder\n\nmore text\n\nand more\n")
    with pytest.raises(UsageError, match="empty string"):
        load_texts(empty)
    with pytest.raises(UsageError, match="empty string"):
        load_corpus(empty)
