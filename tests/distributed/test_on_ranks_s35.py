"""Session 35: `on_ranks` forks its ranks from a server that imported torch and lowbit once; each
rank still starts as a spawned one did."""

from __future__ import annotations

import os
import sys

import torch

from tests.distributed.helpers import on_ranks

PROBE = "LOWBIT_S35_ON_RANKS_PROBE"
CALLERS_STATE = "as imported"  # the caller changes it; a rank imports this module afresh


def _seen(rank, world):
    return {
        "probe": os.environ.get(PROBE),
        "rank": os.environ["RANK"],
        "folder": os.getcwd(),
        "state": sys.modules[__name__].CALLERS_STATE,
        "seed": torch.initial_seed(),
        "pid": os.getpid(),
    }


def test_ranks_start_in_the_callers_environment_and_folder_of_the_call(tmp_path, monkeypatch):
    """The server, started by the first call (this test's or an earlier one's), keeps the
    environment it started with: a rank read that one, not what the caller set since (a test's
    monkeypatched LOWBIT_DIST_TIMEOUT or MASTER_PORT)."""
    first = on_ranks(_seen, 2, timeout=120)
    monkeypatch.setenv(PROBE, "set after the server started")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "CALLERS_STATE", "changed by the caller")
    ranks = on_ranks(_seen, 2, timeout=120)
    assert [r["probe"] for r in ranks] == ["set after the server started"] * 2
    assert [r["rank"] for r in ranks] == ["0", "1"]
    assert {r["folder"] for r in ranks} == {str(tmp_path)}
    # a fresh process, not a fork of the caller's
    assert [r["state"] for r in ranks] == ["as imported"] * 2
    assert len({r["pid"] for r in first + ranks} | {os.getpid()}) == 5


def test_every_rank_seeds_its_generator_afresh():
    """A spawned process seeds torch's generator from the system's entropy; forked from the
    server, every rank of every call had the server's seed, and drew what the others drew."""
    seeds = [r["seed"] for r in on_ranks(_seen, 2, timeout=120) + on_ranks(_seen, 2, timeout=120)]
    assert len(set(seeds)) == 4, seeds
