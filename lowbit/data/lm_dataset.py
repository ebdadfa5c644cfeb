"""Causal-LM batches from a split of documents.

The documents of a split are tokenized and concatenated with the end-of-text id between them
(`tokenize_split`). Training batches (`LMBatches`) are random windows of ``seq_len + 1`` tokens;
``input_ids`` is a window without its last token and ``labels`` the window without its first, so
the loss is ``cross_entropy(logits, labels)`` with no further shift (do not pass these labels
to a Hugging Face model's ``labels=`` argument, which shifts again). Batch ``i`` is drawn from a
generator seeded by ``(seed, i)``, so a run resumed from ``state_dict()`` continues with exactly
the batches of an uninterrupted run.

Evaluation (`eval_batches`) uses fixed, non-overlapping windows, spread evenly over the split when
capped, so every evaluation of a run (and of every run with the same data) sees the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.data.batches import SeekableBatches
from lowbit.errors import UsageError
from lowbit.formats.counter_rng import seeded_generator


def tokenize_split(tokenizer, texts: list[str]) -> torch.Tensor:
    """One int32 tensor of token ids: the texts joined by the tokenizer's end-of-text id."""
    return torch.from_numpy(np.ascontiguousarray(tokenizer.encode_documents(texts)))


def _check_length(tokens: torch.Tensor, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise UsageError(
            f"{len(tokens)} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}; "
            "fix: use more data or a shorter sequence length"
        )


class LMBatches(SeekableBatches):
    """Endless, resumable random windows: yields ``(input_ids, labels)``, both int64 (batch, seq_len)."""

    kind = "LM batches"

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        _check_length(tokens, seq_len)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.step = 0
        self._offsets = torch.arange(seq_len + 1)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index`` (independent of the iterator's position)."""
        high = len(self.tokens) - self.seq_len  # last valid window start + 1
        starts = torch.randint(
            high, (self.batch_size,), generator=seeded_generator(self.seed, index)
        )
        windows = self.tokens[starts[:, None] + self._offsets].long()
        return windows[:, :-1], windows[:, 1:]

    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
        }


def eval_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed ``(input_ids, labels)`` batches of non-overlapping windows (stride ``seq_len``).

    Every token after the first is a label exactly once. With ``max_batches``, at most
    ``max_batches * batch_size`` windows are kept, evenly spaced over the split. The last batch may
    have fewer rows.
    """
    _check_length(tokens, seq_len)
    count = (len(tokens) - 1) // seq_len
    starts = torch.arange(count) * seq_len
    if max_batches is not None and count > max_batches * batch_size:
        keep = torch.linspace(0, count - 1, max_batches * batch_size).round().long()
        starts = starts[keep]
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return [(chunk[:, :-1], chunk[:, 1:]) for chunk in torch.split(windows, batch_size)]
