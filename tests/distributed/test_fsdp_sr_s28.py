"""FSDP2 under bf16-pure-sr: the update's stochastic rounding of each rank's shard draws apart
from every other shard's, and every rank moves the stream the ranks share alike."""

from __future__ import annotations

import torch

from lowbit import Precision
from tests.distributed.helpers import on_ranks

STEPS = 3


def _steps(rank=0, world=1) -> dict:
    """A user's own loop: Linear(8, 5, no bias) with five equal rows (shards of 3 and 2 rows on 2
    ranks), in bf16-pure-sr, SGD steps of about half a bf16 spacing, so most roundings are a coin
    toss. Every rank trains on the same batch, so the rows stay equal up to their roundings."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(0.5, 1.0, 8).expand(5, 8))
    precision = Precision("bf16-pure-sr")
    precision.convert(model)
    fully_shard(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-3))
    x = torch.linspace(-1.0, 1.0, 32).reshape(4, 8).bfloat16()
    for _ in range(STEPS):
        precision.backward(model(x).float().sum())
        precision.step(optimizer)
        optimizer.zero_grad()
    return {"weight": model.weight.full_tensor().float(), "next_draw": torch.rand(1).item()}


def test_fsdp_shards_draw_their_own_rounding_and_move_the_shared_stream_alike():
    """Each shard drew the draws of a tensor of its own shape from the generator every rank
    shares: element i of rank 0's and of rank 1's shard took the same uniform, so equal rows
    rounded equally on both ranks (correlated noise), and the ranks' unequal shards (3 and 2
    rows) moved the shared stream unequally."""
    ranks = on_ranks(_steps, 2, timeout=60)
    weight = ranks[0]["weight"]
    assert torch.equal(weight, ranks[1]["weight"])  # one parameter, gathered alike
    # rows 0 (rank 0's first) and 3 (rank 1's first) start equal and take the same updates: only
    # their rounding tells them apart
    assert not torch.equal(weight[0], weight[3])
    assert ranks[0]["next_draw"] == ranks[1]["next_draw"]
