"""A token-classification task on a pretrained encoder loads the encoder's tokenizer once.

The built-in task's packing (by word pieces) loaded the tokenizer, and the task loaded it again
to encode the sentences: two loads per run (~40 ms of CPU each for MiniLM's) and two
serializations of it for the word-pieces cache's key. A second task of the same settings in one
process (`lowbit compare` trains many) reuses the first's.
"""

import pytest
from transformers import AutoTokenizer

from lowbit.data import corpus
from lowbit.train import TrainConfig
from lowbit.train.tasks import build_task
from tests.train.test_pretrained_transfer import save_tiny_bert
from tests.train.test_tagging_s29 import WORDS


@pytest.fixture
def small_stdlib(tmp_path, monkeypatch):
    """The built-in task's corpus, the standard library, as a few small files (seconds less)."""
    root = tmp_path / "stdlib"
    root.mkdir()
    for i in range(40):
        (root / f"m{i}.py").write_text(f"def f{i}(self, x):\n    return self.name(x) + {i}\n")
    monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
    corpus.stdlib_documents.cache_clear()
    yield root
    corpus.stdlib_documents.cache_clear()


@pytest.fixture
def loads(monkeypatch):
    """The folders `AutoTokenizer.from_pretrained` is called with from now on."""
    seen = []
    load = AutoTokenizer.from_pretrained.__func__

    def counting(cls, folder, *args, **kwargs):
        seen.append(str(folder))
        return load(cls, folder, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counting))
    return seen


def test_the_built_in_task_loads_the_encoders_tokenizer_once(tmp_path, small_stdlib, loads):
    folder = save_tiny_bert(tmp_path / "bert", WORDS)
    settings = {"task": "token-classification", "model": str(folder), "seq_len": 24}
    first = build_task(TrainConfig(**settings, batch_size=4, out=str(tmp_path / "a")))
    assert loads == [str(folder)]
    second = build_task(TrainConfig(**settings, batch_size=4, out=str(tmp_path / "b")))
    assert loads == [str(folder)]
    for got, expected in zip(second.encoded("validation"), first.encoded("validation")):
        assert got.equal(expected)
