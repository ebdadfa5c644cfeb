"""Data sharding: every rank draws the same global batch and keeps its own rows."""

from __future__ import annotations


class RankSlice:
    """Rows ``[rank * b, (rank + 1) * b)`` of each global batch, ``b = global_batch / world_size``.

    The ranks' slices partition the global batch (no overlap, nothing dropped), so one optimizer
    step sees what a single process sees with the same global batch. The iterator state is the
    global one (the step counter), so a checkpoint resumes with any number of ranks.
    """

    def __init__(self, batches, rank: int, world_size: int):
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def _slice(self, batch):
        rows = len(batch[0]) // self.world_size
        return tuple(t[self.rank * rows : (self.rank + 1) * rows] for t in batch)

    def batch(self, index: int):
        return self._slice(self.batches.batch(index))

    def __iter__(self):
        return self

    def __next__(self):
        return self._slice(next(self.batches))

    def __getattr__(self, name):  # steps_per_epoch, batch_size, ... of the global iterator
        return getattr(self.batches, name)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
