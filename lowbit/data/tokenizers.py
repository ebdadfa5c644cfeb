"""Tokenizers for the causal-LM task: byte-level (fixed, 257 ids) and BPE (trained on train text).

Both have the same interface: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``encode_documents(texts) -> np.ndarray`` (documents joined by the end-of-text id), ``vocab_size``,
``eot_id``, ``save(folder)`` and ``load(folder)``. A folder written by ``save`` holds
``lowbit_tokenizer.json`` (kind and sizes) and, for BPE, the Hugging Face ``tokenizer.json``.

The end-of-text id comes only from lowbit's own document boundaries (`encode_documents`): the
string ``<|endoftext|>`` written in a text is plain text for both, as ``decode`` shows the id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lowbit.errors import UsageError, choose

EOT_TEXT = "<|endoftext|>"
CONFIG_NAME = "lowbit_tokenizer.json"
KINDS = ("byte", "bpe")


class ByteTokenizer:
    """Ids 0-255 are the UTF-8 bytes of the text; id 256 separates documents."""

    kind = "byte"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """All texts as one int32 array, ``eot_id`` between documents (vectorized, no loop per byte)."""
        parts = (np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts)
        return join_documents(parts, self.eot_id)

    def decode(self, ids) -> str:
        """Bytes to text with invalid UTF-8 replaced by U+FFFD; ``eot_id`` shows as ``EOT_TEXT``."""
        ids = [int(i) for i in ids]
        if any(not 0 <= i <= self.eot_id for i in ids):
            raise ValueError(f"byte tokenizer ids are 0..{self.eot_id}")
        pieces, start = [], 0
        for end, i in enumerate([*ids, self.eot_id]):
            if i == self.eot_id:
                pieces.append(bytes(ids[start:end]).decode("utf-8", errors="replace"))
                start = end + 1
        return EOT_TEXT.join(pieces)

    def save(self, folder) -> None:
        _write_config(folder, {"kind": self.kind, "vocab_size": self.vocab_size})

    @classmethod
    def load(cls, folder) -> ByteTokenizer:
        return cls()


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) from the Hugging Face ``tokenizers`` library."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        # "<|endoftext|>" in a text is text, as its 13 bytes are to the byte tokenizer: read as the
        # special token, a document quoting it (this file, a tokenizer's docs) was cut in two
        # where the byte tokenizer saw one. The flag is not saved in tokenizer.json: set it here.
        self._tok.encode_special_tokens = True
        self.eot_id = tokenizer.token_to_id(EOT_TEXT)
        if self.eot_id is None:  # another tokenizer.json put in the folder: no document boundary
            raise ValueError(f"tokenizer.json has no {EOT_TEXT} token")
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """All texts as one int32 array, ``eot_id`` between documents, encoded in Rust in batches
        of about `ENCODE_BATCH_CHARS` characters: ``encode_batch`` keeps every text's
        ``Encoding`` (its tokens' strings and offsets beside the ids, ~130 bytes a token) until it
        returns: `lowbit train --tokenizer bpe` on a 50 MB text file (8.6M training tokens)
        peaked at 1,784 MB RSS with one batch of the split, 697 MB in batches of 2^18 or 2^20
        characters (session 42, `/usr/bin/time -v`). 2^18 cost 20-30% more CPU than one batch;
        2^20 about as much (encoding an 8 MB text file: 3.5-4.4 s CPU, one batch 3.3-3.6 s)."""
        parts = (
            np.asarray(encoding.ids, dtype=np.int32)
            for batch in _batches(texts, ENCODE_BATCH_CHARS)
            for encoding in self._tok.encode_batch(batch)
        )
        return join_documents(parts, self.eot_id)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder) -> None:
        _write_config(folder, {"kind": self.kind, "vocab_size": self.vocab_size})
        self._tok.save(str(Path(folder) / "tokenizer.json"))

    @classmethod
    def load(cls, folder) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")))


ENCODE_BATCH_CHARS = 1 << 20  # characters of texts per `BPETokenizer.encode_documents` batch


def _batches(texts: list[str], chars: int):
    """``texts`` in consecutive lists of about ``chars`` characters (a longer text alone)."""
    batch, size = [], 0
    for text in texts:
        if batch and size + len(text) > chars:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


def join_documents(parts, eot_id: int) -> np.ndarray:
    """One int32 array of the documents' ids (``parts``: an integer array per document, of any
    integer dtype), ``eot_id`` between each two. Each part is written into the result once:
    a part made int32 first is a second copy of the text's ids at the peak."""
    eot = np.array([eot_id], dtype=np.int32)
    joined = [piece for i, part in enumerate(parts) for piece in ((eot, part) if i else (part,))]
    return np.concatenate(joined, dtype=np.int32) if joined else np.zeros(0, dtype=np.int32)


def train_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
    """Train byte-level BPE on ``texts`` (pass the train split only) up to ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + 1  # the byte alphabet plus the end-of-text token
    if vocab_size <= minimum:
        raise UsageError(f"BPE vocab size {vocab_size} too small; fix: use more than {minimum}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Each merge shortens the text by a symbol at least, so no text of N bytes learns more than
    # N merges. The trainer reserves memory for the size asked up front (~70 bytes an id): a
    # mistyped --vocab-size 1000000000 aborted the process from Rust ("memory allocation of
    # 70866960400 bytes failed"), and one past 2**64 raised an OverflowError; capped here, the
    # same merges are learned and the caller warns of the smaller size.
    most = minimum + sum(len(text.encode("utf-8")) for text in texts)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, most),
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return BPETokenizer(tok)


def build_tokenizer(kind: str, texts: list[str] | None = None, vocab_size: int | None = None):
    """A ``"byte"`` tokenizer, or a ``"bpe"`` one trained on ``texts`` with ``vocab_size`` ids."""
    choose("tokenizer", kind, KINDS)
    if kind == "byte":
        return ByteTokenizer()
    if not texts or vocab_size is None:
        raise UsageError("a BPE tokenizer needs training texts and a vocab size; fix: pass both")
    return train_bpe(texts, vocab_size)


def load_tokenizer(folder):
    """The tokenizer that ``save(folder)`` wrote."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"{folder}: no {CONFIG_NAME}; fix: point at a folder a run saved")
    damaged = (
        f"{folder}: the saved tokenizer is damaged ({{}}); fix: restore the run's tokenizer folder"
    )
    try:
        kind = json.loads(path.read_text(encoding="utf-8"))["kind"]
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(damaged.format(f"{CONFIG_NAME}: {type(error).__name__}")) from None
    choose("tokenizer", kind, KINDS)
    try:
        return (ByteTokenizer if kind == "byte" else BPETokenizer).load(folder)
    except Exception as error:  # tokenizers raises its own exception types for a bad file
        raise UsageError(damaged.format(" ".join(str(error).split())[:120])) from None


def _write_config(folder, config: dict) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
