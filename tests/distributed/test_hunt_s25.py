"""Session 25's hunt through multi-process training: a user's own FSDP2 loop with `Precision`."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lowbit import Precision
from tests.distributed.helpers import on_ranks


def _fsdp_steps_with_rank_1s_shard_overflowing(rank, world):
    """A user's own FSDP2 loop in fp16-mixed whose gradient overflows in the last output row only,
    which lies in rank 1's shard: what each rank's steps returned and the warnings it got, before
    and after `lowbit.distributed.Ranks` installs the ranks' agreement."""
    from torch.distributed.fsdp import fully_shard

    from lowbit.distributed import Ranks, context

    context._warned_alone = False  # as in a fresh process: the warning is once per process
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    precision = Precision("fp16-mixed")
    precision.convert(model)
    fully_shard(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    overflow = torch.tensor([1.0, 1.0, 1.0, math.inf])

    def step() -> bool:
        precision.backward((model(torch.ones(2, 4)) * overflow).sum())
        stepped = precision.step(optimizer)
        optimizer.zero_grad()
        return stepped

    with warnings.catch_warnings(record=True) as alone_warnings:
        warnings.simplefilter("always")
        alone = [step(), step()]
    Ranks("fsdp", torch.device("cpu"))
    with warnings.catch_warnings(record=True) as agreed_warnings:
        warnings.simplefilter("always")
        agreed = [step(), step()]
    return {
        "alone": alone,
        "agreed": agreed,
        "warnings": [str(w.message) for w in alone_warnings + agreed_warnings],
        "warned_at": [w.filename for w in alone_warnings],
    }


def _users_loops(rank, world, recipes):
    """Every user's loop of this module on the same two ranks (one spawn: seconds per rank): the
    DDP loops of ``recipes`` first, then the FSDP2 one, whose `Ranks` installs the agreement."""
    ddp = {recipe: _warnings_of_a_ddp_loop(rank, world, recipe) for recipe in recipes}
    return {"ddp": ddp, "fsdp": _fsdp_steps_with_rank_1s_shard_overflowing(rank, world)}


@pytest.fixture(scope="module")
def users_loops() -> list[dict]:
    """Each rank's results of `_users_loops`, which the tests only read (the timeout: the three
    spawns' it replaces)."""
    return on_ranks(_users_loops, 2, timeout=180, recipes=("bf16-mixed", "fp8-tensorwise"))


def test_a_users_fsdp_loop_without_ranks_is_warned_once_that_the_ranks_drift_apart(users_loops):
    """docs/distributed.md: a user's own DDP/FSDP2 loop needs `Ranks` for the ranks to agree.
    Without it an overflow in rank 1's gradient shard skipped the step on rank 1 alone while rank
    0 stepped, silently. Rank 0 is now warned, once, naming the fix; with `Ranks` both skip."""
    rank0, rank1 = (rank["fsdp"] for rank in users_loops)
    assert rank0["alone"] == [True, True] and rank1["alone"] == [False, False]  # what it warns of
    assert rank0["agreed"] == rank1["agreed"] == [False, False]
    (message,) = rank0["warnings"]
    assert "fix: build lowbit.distributed.Ranks(strategy, device)" in message
    assert "\n" not in message
    assert rank0["warned_at"] == [__file__]  # the user's precision.step line
    assert rank1["warnings"] == []


def test_one_process_without_a_process_group_is_not_warned():
    model = torch.nn.Linear(4, 4)
    precision = Precision("fp16-mixed")
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    precision.backward(model(torch.ones(2, 4)).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.step(optimizer)


def _warnings_of_a_ddp_loop(rank, world, recipe):
    """The warnings rank ``rank`` gets from two steps of a user's own DDP loop without `Ranks`."""
    from torch.nn.parallel import DistributedDataParallel

    from lowbit.distributed import context

    context._warned_alone = False  # as in a fresh process: the warning is once per process
    torch.manual_seed(0)
    precision = Precision(recipe)
    model = DistributedDataParallel(precision.convert(torch.nn.Linear(16, 16)))
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with precision.autocast():
                loss = model(torch.randn(4, 16)).float().pow(2).sum()
            precision.backward(loss)
            precision.step(optimizer)
            optimizer.zero_grad()
    return [str(w.message) for w in caught if "agreement" in str(w.message)]


def test_a_ddp_loop_is_warned_only_where_the_recipe_computes_otherwise_alone(users_loops):
    """bf16-mixed has no loss scale and no scales to agree on: its ranks compute what one process
    does, and a warning that they "drift apart" would be false; fp8-tensorwise's ranks scale by
    their own part of the batch, and rank 0 is told so, once."""
    assert [rank["ddp"]["bf16-mixed"] for rank in users_loops] == [[], []]
    rank0, rank1 = (rank["ddp"]["fp8-tensorwise"] for rank in users_loops)
    (message,) = rank0
    assert "scales activations and gradients by its own part of the batch" in message
    assert rank1 == []
