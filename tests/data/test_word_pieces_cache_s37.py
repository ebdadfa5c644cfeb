"""The on-disk cache of what a pretrained tokenizer makes of the token-classification words.

Every process that built the task on a pretrained encoder ran its tokenizer over the whole
tagged corpus again (a second or two: each `lowbit compare --jobs` worker, each test
subprocess): once to count each word's pieces (packing), once per split to encode it. Both are
read back now, identical to encoding, and never for another tokenizer, length or label map.
Reading the tokenizer's state, in turn, serialized it twice on every lookup (a second for a
Llama-3-size one), with the cache off too; and the folder grew by entries per setting unbounded.
"""

import hashlib
import json
import time

import pytest
import torch

from lowbit.data import syntax_tag_task
from lowbit.data.syntax_tags import LABELS, PIECES_KEPT, encode_with_tokenizer, piece_counts
from lowbit.train import TrainConfig
from lowbit.train.tasks import _syntax_tags, build_task
from tests.train.test_pretrained_transfer import save_tiny_bert
from tests.train.test_tagging_s29 import WORDS

LABEL2ID = {label: i for i, label in enumerate(LABELS)}


def bert(words=WORDS):
    """A fresh word-piece tokenizer object, as each process loads its own."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture(scope="module")
def sentences():
    """Real sentences: the first stdlib files of each split, packed by the tokenizer's pieces."""
    split = syntax_tag_task(
        max_files=2, max_eval_files=1, window=30, piece_counter=piece_counts(bert())
    )
    return split["train"] + split["validation"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def tokenized(monkeypatch):
    """The words handed to a tokenizer's __call__ from now on (``.clear()`` to restart)."""
    seen: list[str] = []
    call = type(bert()).__call__

    def counting(self, text=None, *args, **kwargs):
        for item in text if isinstance(text, list | tuple) else [text]:
            seen.extend(item if isinstance(item, list | tuple) else [item])
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(bert()), "__call__", counting)
    return seen


def uncached(monkeypatch, tokenizer, sentences, label2id, max_len):
    with monkeypatch.context() as patch:
        patch.setenv("LOWBIT_CACHE_DIR", "")
        return encode_with_tokenizer(tokenizer, sentences, label2id, max_len)


def assert_same(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.long
        assert torch.equal(got[name], tensor), name


CHANGES = {  # (tokenizer, sentences, label2id, max_len) -> the same with one thing changed
    "vocabulary": lambda t, s, ids, n: (bert([*WORDS[:-3], "##e", "##f", "##n"]), s, ids, n),
    "length": lambda t, s, ids, n: (t, s, ids, n - 7),
    "label ids": lambda t, s, ids, n: (t, s, dict(zip(ids, reversed(ids.values()))), n),
    "words": lambda t, s, ids, n: (t, s[1:], ids, n),
}


@pytest.mark.parametrize("change", CHANGES)
def test_an_encoding_is_read_back_for_the_same_inputs_alone(
    cache, sentences, tokenized, monkeypatch, change
):
    """A second encoding of the same words by a tokenizer of the same state (another object, as
    another process loads it) is read, not tokenized, and identical; one thing changed is
    encoded afresh as without a cache, and leaves the first entry as it was."""
    inputs = (bert(), sentences, LABEL2ID, 32)
    expected = uncached(monkeypatch, *inputs)
    assert_same(encode_with_tokenizer(*inputs), expected)
    changed = CHANGES[change](*inputs)
    tokenized.clear()
    assert_same(encode_with_tokenizer(*changed), uncached(monkeypatch, *changed))
    assert tokenized  # a miss: the changed inputs were tokenized
    tokenized.clear()
    assert_same(encode_with_tokenizer(bert(), *inputs[1:]), expected)
    assert not tokenized


def test_the_truncation_a_tokenizer_call_leaves_behind_does_not_change_the_key(
    cache, sentences, tokenized, monkeypatch
):
    """A call sets its truncation on the tokenizer's backend and leaves it there: read as part of
    the tokenizer, it made the validation split (encoded after train) a miss in every process."""
    tokenizer = bert()
    expected = uncached(monkeypatch, tokenizer, sentences, LABEL2ID, 32)
    encode_with_tokenizer(tokenizer, sentences, LABEL2ID, 32)
    tokenizer([["x", "y"]], is_split_into_words=True, truncation=True, max_length=3)
    tokenized.clear()
    assert_same(encode_with_tokenizer(tokenizer, sentences, LABEL2ID, 32), expected)
    assert not tokenized


def test_piece_counts_are_read_back(cache, sentences, tokenized, monkeypatch):
    words = sorted({w for s in sentences for w in s.tokens})
    with monkeypatch.context() as patch:
        patch.setenv("LOWBIT_CACHE_DIR", "")
        expected = piece_counts(bert())(words)
    assert piece_counts(bert())(words) == expected
    count = piece_counts(bert())
    tokenized.clear()
    assert count(words) == expected
    assert not tokenized


@pytest.mark.parametrize(
    "payload",
    [b"null", b'{"shape":[1,2],"input_ids":"AAAA","attention_mask":"AAAA","labels":"AAAA"}', None],
)
def test_a_damaged_or_foreign_entry_is_encoded_again(
    cache, sentences, tokenized, monkeypatch, payload
):
    """An entry whose value is not an encoding of the right size (its checksum made to match, as
    a hand edit could) is a miss: encoded again, and rewritten for the next process."""
    inputs = (bert(), sentences[:5], LABEL2ID, 16)
    expected = uncached(monkeypatch, *inputs)
    encode_with_tokenizer(*inputs)
    entries = sorted(cache.glob("word-pieces/*/*.json"))
    assert entries
    for entry in entries:
        header, _, old = entry.read_bytes().partition(b"\n")
        value = payload if payload is not None else old[: len(old) // 2] + b'"}'  # cut short
        meta = {**json.loads(header), "sha256": hashlib.sha256(value).hexdigest()}
        entry.write_bytes(json.dumps(meta).encode() + b"\n" + value)
    tokenized.clear()
    assert_same(encode_with_tokenizer(*inputs), expected)
    assert tokenized
    tokenized.clear()
    assert_same(encode_with_tokenizer(*inputs), expected)
    assert not tokenized


class Serializations:
    """A tokenizer's backend that counts its serializations (``to_str``): the cost of reading a
    large tokenizer's state, a second for a Llama-3-size one (128k pieces, 5.5 MB of JSON)."""

    def __init__(self, backend):
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "count", 0)

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __setattr__(self, name, value):
        setattr(self.backend, name, value)

    def to_str(self, *args, **kwargs):
        object.__setattr__(self, "count", self.count + 1)
        return self.backend.to_str(*args, **kwargs)


def counted():
    tokenizer = bert()
    tokenizer._tokenizer = Serializations(tokenizer.backend_tokenizer)
    return tokenizer, tokenizer.backend_tokenizer


def test_a_tokenizer_is_serialized_once_per_process_and_not_with_the_cache_off(
    cache, sentences, monkeypatch
):
    """A task's piece counts and each split's encoding read the tokenizer's state once in all
    (not once each), and not at all with the cache off (``LOWBIT_CACHE_DIR=``)."""
    words = sorted({w for s in sentences for w in s.tokens})
    tokenizer, backend = counted()
    with monkeypatch.context() as patch:
        patch.setenv("LOWBIT_CACHE_DIR", "")
        piece_counts(tokenizer)(words)
        encode_with_tokenizer(tokenizer, sentences, LABEL2ID, 32)
    assert backend.count == 0
    piece_counts(tokenizer)(words)
    for part in (sentences[:3], sentences[3:]):  # two splits
        expected = uncached(monkeypatch, tokenizer, part, LABEL2ID, 32)
        assert_same(encode_with_tokenizer(tokenizer, part, LABEL2ID, 32), expected)
    assert backend.count == 1


def test_the_key_outlives_a_call_that_sets_truncation_and_padding_but_not_added_tokens(
    cache, sentences, tokenized, monkeypatch
):
    """A call that leaves truncation and padding on the tokenizer keeps its key, whether the
    process read the key before or reads it first then (which leaves them as they were); a word
    added to its vocabulary makes a new key, though the process read the key before."""
    tokenizer = bert()
    expected = uncached(monkeypatch, tokenizer, sentences, LABEL2ID, 32)
    encode_with_tokenizer(tokenizer, sentences, LABEL2ID, 32)
    for reader in (tokenizer, bert()):
        reader([["x", "y"]], is_split_into_words=True, truncation=True, max_length=5, padding=True)
        backend = reader.backend_tokenizer
        left = (backend.truncation, backend.padding)
        assert None not in left
        tokenized.clear()
        assert_same(encode_with_tokenizer(reader, sentences, LABEL2ID, 32), expected)
        assert not tokenized
        assert (backend.truncation, backend.padding) == left

    word = next(w for s in sentences for w in s.tokens if w.isalpha() and w not in WORDS)
    assert tokenizer.add_tokens([word]) == 1  # a word of the sentences, [UNK] before
    added = uncached(monkeypatch, tokenizer, sentences, LABEL2ID, 32)
    assert not torch.equal(added["input_ids"], expected["input_ids"])
    tokenized.clear()
    assert_same(encode_with_tokenizer(tokenizer, sentences, LABEL2ID, 32), added)
    assert tokenized


def test_the_word_pieces_keep_their_most_recently_used_entries(cache, tokenized):
    """Each new word list (as each new tokenizer, length or label map) adds an entry; past
    `PIECES_KEPT` the least recently used goes: one read since is kept over one written after
    it."""
    count = piece_counts(bert())
    count(["w0"])
    time.sleep(0.02)  # the entries' times apart on a file system of coarse times
    count(["w1"])
    time.sleep(0.02)
    for n in range(2, PIECES_KEPT):
        count([f"w{n}"])
    time.sleep(0.02)
    tokenized.clear()
    count(["w0"])  # read: now the most recently used
    assert not tokenized
    count([f"w{PIECES_KEPT}"])
    assert len(list(cache.glob("word-pieces/*/*.json"))) == PIECES_KEPT
    tokenized.clear()
    count(["w0"])
    count([f"w{PIECES_KEPT}"])
    assert not tokenized
    count(["w1"])  # the least recently used: gone
    assert tokenized == ["w1"]


@pytest.mark.slow  # the whole built-in task, twice (its tags are cold in a new session)
def test_a_second_process_builds_the_task_without_tokenizing_the_corpus(tmp_path, tokenized):
    """The built-in task on a pretrained encoder, built again as a fresh process does: its words
    are neither counted in pieces nor encoded by the tokenizer again (the few words left are
    the probes of how it spaces words), and its tensors are the first build's."""
    folder = save_tiny_bert(tmp_path / "bert", WORDS)
    settings = {
        "task": "token-classification",
        "model": str(folder),
        "seq_len": 24,
        "batch_size": 16,
    }
    first = build_task(TrainConfig(**settings, out=str(tmp_path / "a")))
    _syntax_tags.cache_clear()  # as in a new process
    tokenized.clear()
    second = build_task(TrainConfig(**settings, out=str(tmp_path / "b")))
    assert len(tokenized) < 10
    for split in ("train", "validation"):
        for got, expected in zip(second.encoded(split), first.encoded(split)):
            assert torch.equal(got, expected)
