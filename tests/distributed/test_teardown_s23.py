"""Leaving the process group (`Ranks.close`): a clean exit waits until every rank is done with
its collectives; a rank leaving on an error does not wait for the others."""

from __future__ import annotations

import contextlib
import time

import torch

from lowbit.distributed.context import join
from tests.distributed.helpers import on_ranks

SLOW_RANK_DELAY_S = 2.0  # how much later than rank 0 rank 1 leaves


def _close_timed(rank: int, nproc: int, failing: tuple[int, ...]) -> float:
    """Join a two-rank group, leave it (rank 1 later than rank 0; the ``failing`` ranks while an
    error propagates) and return the seconds this rank spent in `close`, whether or not it
    raised (a clean rank's barrier fails once the other rank has left on an error)."""
    ranks = join("ddp", torch.device("cpu"))
    if rank == 1:
        time.sleep(SLOW_RANK_DELAY_S)
    start = time.monotonic()
    with contextlib.suppress(RuntimeError):
        try:
            if rank in failing:
                raise RuntimeError("this rank failed")
        finally:
            ranks.close()
    return time.monotonic() - start


def _seconds_in_close(failing: tuple[int, ...]) -> list[float]:
    return on_ranks(_close_timed, nproc=2, timeout=60, group=False, failing=failing)


def test_a_clean_exit_leaves_the_group_only_when_every_rank_is_done():
    """Rank 0 waits in `close` for rank 1: a rank that leaves first can abort one that is still
    inside the last collective ("terminate called without an active exception")."""
    rank_0, rank_1 = _seconds_in_close(failing=())
    assert rank_0 > SLOW_RANK_DELAY_S / 2
    assert rank_1 < SLOW_RANK_DELAY_S / 2


def test_a_failing_rank_leaves_at_once_and_the_others_do_not_hang():
    """Rank 0 leaves on an error without waiting for rank 1; rank 1, exiting cleanly later, is
    not left waiting for the group's timeout (its barrier fails at once with rank 0 gone)."""
    rank_0, rank_1 = _seconds_in_close(failing=(0,))
    assert rank_0 < SLOW_RANK_DELAY_S / 2
    assert rank_1 < SLOW_RANK_DELAY_S / 2
