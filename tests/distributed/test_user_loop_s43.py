"""Session 43: `lowbit.distributed.Ranks.wrap`, offered to users' own DDP/FSDP2 loops
(docs/distributed.md), summed the ranks' gradients once `lowbit train` backpropagated each rank's
share of the step's loss: a loop that backpropagates each rank's own mean loss (plain DDP's
convention) got twice one process's gradient on two ranks, without a word. `wrap` averages again;
the trainer asks for the sum (its fp16 steps: tests/distributed/test_loss_scale_s43.py)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import on_ranks

ROWS = 8


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, 16, generator=generator), torch.randn(ROWS, 4, generator=generator)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def one_process_gradient() -> torch.Tensor:
    """The first layer's weight gradient of the mean loss over every row, in one process."""
    x, y = data()
    net = model()
    torch.nn.functional.mse_loss(net(x), y).backward()
    return net[0].weight.grad


def _own_loop(rank, world, strategy):
    import lowbit
    from lowbit.distributed import Ranks

    precision = lowbit.Precision("fp32")
    train, saved = Ranks(strategy, torch.device("cpu")).wrap(precision.convert(model()), precision)
    x, y = data()
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    precision.backward(torch.nn.functional.mse_loss(train(x[rows]), y[rows]))  # its own mean
    grad = saved[0].weight.grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_loop_backpropagating_each_ranks_mean_gets_one_process_gradient(strategy):
    expected = one_process_gradient()
    for grad in on_ranks(_own_loop, strategy=strategy):
        torch.testing.assert_close(grad, expected)  # was twice it
