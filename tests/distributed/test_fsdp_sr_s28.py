"""FSDP2 under bf16-pure-sr: the update's stochastic rounding of each rank's shard takes the draws
one process takes for the whole tensor."""

from __future__ import annotations

import torch

from lowbit import Precision
from tests.distributed.helpers import on_ranks

STEPS = 3


def _steps(rank=0, world=1, shard=False) -> dict:
    """A user's own loop: Linear(4, 5) (5 rows: shards of 3 and 2 rows on 2 ranks) in bf16-pure-sr,
    SGD steps of about half a bf16 spacing, so most roundings are a coin toss. Every rank trains on
    the same batch, so the averaged gradient is one process's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5)
    precision = Precision("bf16-pure-sr")
    precision.convert(model)
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-3))
    x = torch.linspace(-1.0, 1.0, 32).reshape(8, 4).bfloat16()
    for _ in range(STEPS):
        precision.backward(model(x).float().square().mean())
        precision.step(optimizer)
        optimizer.zero_grad()
    params = [p.full_tensor() if shard else p.detach() for p in model.parameters()]
    return {"params": [p.float() for p in params], "next_draw": torch.rand(1).item()}


def test_fsdp_shards_round_as_one_process_rounds_the_whole_tensor():
    """Each rank's shard drew the draws of a tensor of its shard's shape from the generator every
    rank shares: element i of rank 0's and of rank 1's shard took the same uniform (correlated
    rounding noise), and the ranks' unequal shards moved the shared stream unequally. Now the
    parameters after the steps are one process's, bit for bit, and the stream moved alike."""
    alone = _steps()
    ranks = on_ranks(_steps, 2, timeout=60, shard=True)
    for result in ranks:
        for got, want in zip(result["params"], alone["params"], strict=True):
            assert torch.equal(got, want)
        assert result["next_draw"] == alone["next_draw"]
