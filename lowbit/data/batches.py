"""Deterministic, resumable batches of labelled examples (digits, token classification).

Batch ``i`` is a pure function of ``(seed, i)``: epoch ``i // steps_per_epoch`` is a permutation
drawn from a generator seeded by ``(seed, epoch)``, and the batch is a slice of it. Resuming is
therefore only a matter of restoring the step counter (`TensorBatches.state_dict`).
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError
from lowbit.formats.counter_rng import seeded_generator


def check_state(kind: str, expected: dict, state: dict) -> None:
    """Raise a `UsageError` when a saved batch state was made for different data or shapes."""
    different = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if different:
        detail = ", ".join(f"{k} saved {a} now {b}" for k, (a, b) in different.items())
        raise UsageError(
            f"cannot resume {kind}: {detail}; fix: resume with the same data and batch settings"
        )


class SeekableBatches:
    """An endless batch stream whose ``batch(step)`` depends only on the step and the stream's
    identity (`_identity`: seed, sizes), so its whole state is the step count. Subclasses define
    ``batch``, ``_identity``, ``kind`` (the name a resume error uses) and set ``self.step = 0``."""

    kind = "batches"

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _identity(self) -> dict:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {**self._identity(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        check_state(self.kind, self._identity(), state)
        self.step = int(state["step"])


class TensorBatches(SeekableBatches):
    """Endless shuffled batches over tensors that share their first dimension.

    Iterating yields tuples of tensors of ``batch_size`` rows (the last rows of an epoch that do not
    fill a batch are dropped). ``step`` counts the batches served.

    ``grad_accum`` micro-batches make one optimizer step, and an epoch holds whole steps: the
    rows that do not fill a step's ``grad_accum * batch_size`` are dropped. The micro-batches of
    a step are then the rows, in order, of the one batch of ``grad_accum * batch_size`` rows of
    the same step without accumulation (a step never takes rows from two epochs), and an epoch of
    steps is one pass over the rows.
    """

    def __init__(
        self, tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int = 0, grad_accum: int = 1
    ):
        self.tensors = tuple(tensors)
        self.num_rows = len(self.tensors[0])
        if any(len(t) != self.num_rows for t in self.tensors):
            raise ValueError("all tensors need the same number of rows")
        if not 0 < batch_size <= self.num_rows:  # below 1: refused with the flag's other checks
            raise UsageError(
                f"batch size {batch_size} is more than the {self.num_rows} training examples "
                f"there are; fix: --batch-size {self.num_rows} or less"
            )
        if batch_size * grad_accum > self.num_rows:
            raise UsageError(
                f"batch size {batch_size} x grad-accum {grad_accum} = {batch_size * grad_accum} "
                f"examples per optimizer step, more than the {self.num_rows} there are; fix: "
                "lower --batch-size or --grad-accum"
            )
        self.batch_size = batch_size
        self.seed = seed
        # micro-batches per epoch: whole optimizer steps
        self.steps_per_epoch = self.num_rows // (batch_size * grad_accum) * grad_accum
        self.step = 0

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        """Batch number ``index`` (independent of the iterator's position)."""
        epoch, offset = divmod(index, self.steps_per_epoch)
        order = torch.randperm(self.num_rows, generator=seeded_generator(self.seed, epoch))
        rows = order[offset * self.batch_size : (offset + 1) * self.batch_size]
        return tuple(t[rows] for t in self.tensors)

    def _identity(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "num_rows": self.num_rows}


def fixed_batches(tensors: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple]:
    """All rows in order, in batches of ``batch_size`` (the last may be smaller): for evaluation."""
    num_rows = len(tensors[0])
    return [
        tuple(t[start : start + batch_size] for t in tensors)
        for start in range(0, num_rows, batch_size)
    ]
