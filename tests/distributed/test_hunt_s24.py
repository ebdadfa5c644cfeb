"""Session 24's hunt through `lowbit train`'s multi-process runs: resuming them as they were, a
rank that hangs, the caller's environment after a one-process group."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from lowbit.train import TrainConfig, train
from tests.distributed.helpers import TINY, on_ranks


def _params(model) -> torch.Tensor:
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().float().reshape(-1) for p in full])


def _uninterrupted_and_resumed(rank, world, out):
    """The parameters after 3 steps of bf16-pure-sr under FSDP: straight through, and resumed
    by the same two ranks from the checkpoint of step 2."""
    import torch.distributed as dist

    from lowbit.distributed import Ranks
    from lowbit.train import Trainer

    def config(folder):
        return TrainConfig(
            model="nano", recipe="bf16-pure-sr", strategy="fsdp", nproc=world, steps=3,
            save_interval=2, keep_last=5, out=str(Path(out) / folder), **TINY,
        )  # fmt: skip

    cpu = torch.device("cpu")
    straight = Trainer(config("straight"), quiet=True, dist=Ranks("fsdp", cpu))
    straight.fit()
    if rank == 0:  # the run as a stop after step 2 left it
        shutil.copytree(Path(out) / "straight", Path(out) / "resumed")
        shutil.rmtree(Path(out) / "resumed" / "checkpoints" / "step-0000003.dcp")
    dist.barrier()
    resumed = Trainer(config("resumed"), quiet=True, dist=Ranks("fsdp", cpu), resume=True)
    resumed.fit(resume=True)
    return _params(straight.model), _params(resumed.model)


def test_a_run_resumed_by_as_many_ranks_draws_each_ranks_own_rounding(tmp_path):
    """Each FSDP rank's generators are its own (before session 28, shards of different sizes took
    different numbers of draws from the stream the ranks share; now the forward's streams, its
    dropout, are each rank's, `RankRandom`), so after a step the ranks' states differ. The checkpoint
    kept rank 0's alone and every rank resumed with it: rank 1 drew other bits than the
    uninterrupted run, whose parameters the resumed run missed (README: a resumed run is
    bit-identical to an uninterrupted one)."""
    for straight, resumed in on_ranks(_uninterrupted_and_resumed, 2, timeout=120, out=tmp_path):
        assert torch.equal(straight, resumed)


HANG_S = 8.0  # how long rank 1 stays away from the collective rank 0 is in, at most
TIMEOUT_S = 2  # LOWBIT_DIST_TIMEOUT


def _seconds_to_fail_an_amax_all_reduce(rank, world, given_up):
    """Rank 0 agrees on an amax with rank 1, which hangs for ``HANG_S`` seconds first, or until
    rank 0 has given up on it (the file ``given_up``: no need to sit out the rest); the seconds
    rank 0 waited before its all-reduce failed (None: it did not)."""
    import torch.distributed as dist

    from lowbit.distributed import Ranks
    from lowbit.nn.operand import scale_agreement

    # set once both ranks are in the group (which waited 120 s for both to start)
    os.environ["LOWBIT_DIST_TIMEOUT"] = str(TIMEOUT_S)
    dist.barrier()
    Ranks("ddp", torch.device("cpu"))
    start = time.monotonic()
    if rank == 1:
        while not Path(given_up).exists() and time.monotonic() - start < HANG_S:
            time.sleep(0.05)
        return None
    try:
        scale_agreement().amax(torch.ones(1))
    except RuntimeError:
        return time.monotonic() - start
    finally:
        Path(given_up).touch()
    return None


def test_a_hung_rank_times_out_the_scale_agreement_after_lowbit_dist_timeout(tmp_path):
    """docs/distributed.md: every collective times out after LOWBIT_DIST_TIMEOUT seconds. The
    amax all-reduces run on a process group of their own, which torch's ``new_group`` gave its
    default timeout of 30 minutes: rank 0 waited for the hung rank as long as it hung."""
    given_up = str(tmp_path / "given-up")
    waited, _ = on_ranks(_seconds_to_fail_an_amax_all_reduce, 2, timeout=30, given_up=given_up)
    assert waited is not None and waited < HANG_S / 2


def test_a_one_process_group_gives_back_the_callers_rendezvous_variables(tmp_path, monkeypatch):
    """``train`` with a strategy and one process runs a group of one on variables of its own
    (RANK, MASTER_ADDR, MASTER_PORT...) and removed them on leaving: a MASTER_ADDR/MASTER_PORT
    the caller had exported for a later torchrun or ``init_process_group`` were gone."""
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.delenv("RANK", raising=False)
    config = TrainConfig(model="nano", strategy="ddp", steps=1, out=str(tmp_path / "run"), **TINY)
    train(config, quiet=True)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.7", "29555")
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
