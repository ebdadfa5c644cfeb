import numpy as np
import pytest

from lowbit.data.tokenizers import (
    EOT_TEXT,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from lowbit.errors import UsageError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0  # héllo ☃\n",
    "for i in range(10):\n    print(i)\n",
] * 20


def test_byte_round_trip_and_ids():
    tok = ByteTokenizer()
    text = "héllo ☃\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 257 and tok.eot_id == 256


def test_byte_decode_replaces_invalid_utf8_and_shows_separator():
    tok = ByteTokenizer()
    assert tok.decode([0xC3, 104, 256, 105]) == "\ufffdh" + EOT_TEXT + "i"
    with pytest.raises(ValueError):
        tok.decode([257])


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encode_documents_joins_with_separator(kind):
    tok = build_tokenizer(kind, TEXTS, 300)
    joined = tok.encode_documents(TEXTS[:2])
    expected = [*tok.encode(TEXTS[0]), tok.eot_id, *tok.encode(TEXTS[1])]
    assert joined.dtype == np.int32
    assert joined.tolist() == expected


def test_bpe_round_trip_compresses_and_save_load(tmp_path):
    tok = build_tokenizer("bpe", TEXTS, 320)
    assert tok.vocab_size <= 320
    for text in (TEXTS[0], TEXTS[1], "unseen ünïcode ☃ text"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges were learned
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == "bpe" and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)


def test_bad_tokenizer_requests():
    with pytest.raises(UsageError, match="unknown tokenizer 'wordpiece'"):
        build_tokenizer("wordpiece")
    with pytest.raises(UsageError, match="too small"):
        build_tokenizer("bpe", TEXTS, 200)
    with pytest.raises(UsageError, match="needs training texts"):
        build_tokenizer("bpe", None, 1000)


def test_load_from_folder_without_tokenizer(tmp_path):
    with pytest.raises(UsageError, match=r"lowbit_tokenizer\.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("damage", ["config", "bpe"])
def test_a_damaged_saved_tokenizer_is_a_one_line_error(tmp_path, damage):
    texts = ["def f(x):\n    return x + 1\n"] * 50
    build_tokenizer("bpe", texts, 300).save(tmp_path)
    name = "lowbit_tokenizer.json" if damage == "config" else "tokenizer.json"
    (tmp_path / name).write_text('{"truncated": ')
    with pytest.raises(UsageError, match="saved tokenizer is damaged") as error:
        load_tokenizer(tmp_path)
    assert "\n" not in str(error.value)
