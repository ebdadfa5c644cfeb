"""Session 43: fp16's loss scale on two ranks backs off at the steps one process does.

Each rank backpropagated the mean loss of its own half of the global batch, and DDP/FSDP averaged
the ranks' gradients after the backward: inside the backward every gradient was twice one
process's, so the scaled fp16 gradients overflowed at half the loss scale. `lowbit train --nproc 2
--recipe fp16-mixed --loss-scale 1e7` skipped a step that one process took (train loss 5.555 at
step 4, one process's 4.958, measured with this file's setting), and every later step differed.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.distributed import SINGLE
from tests.distributed.helpers import on_ranks
from tests.distributed.test_training import config

STEPS = 4
LOSS_SCALE = 1e7  # overflows the tiny LM's fp16 gradients for its first steps, then no more


def scaled_steps(cfg, ranks) -> list[tuple[float, float]]:
    """(train loss, loss scale after the step) of each step of the run ``cfg`` on ``ranks``."""
    from lowbit.train import Trainer

    seen = []
    trainer = Trainer(cfg, quiet=True, dist=ranks)
    trainer.sample = False
    trainer.fit(
        overwrite=True,
        on_step=lambda t: seen.append((t.recent_losses[-1], t.precision.loss_scale)),
    )
    return seen


def _two_ranks(rank, world, out, strategy):
    from lowbit.distributed import Ranks

    cfg = config(
        out, "fp16-mixed", steps=STEPS, loss_scale=LOSS_SCALE, strategy=strategy, nproc=world
    )
    return scaled_steps(cfg, Ranks(strategy, torch.device("cpu")))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return scaled_steps(config(out, "fp16-mixed", steps=STEPS, loss_scale=LOSS_SCALE), SINGLE)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_skip_the_steps_one_process_skips(one_process, strategy, tmp_path):
    ranks = on_ranks(_two_ranks, out=str(tmp_path / strategy), strategy=strategy)
    scales = [scale for _, scale in one_process]
    assert scales[0] < LOSS_SCALE < scales[-1] * 2**STEPS  # one process overflowed, then stepped
    for seen in ranks:
        assert [scale for _, scale in seen] == scales
        gaps = [
            abs(loss - one) / one for (loss, _), (one, _) in zip(seen, one_process, strict=True)
        ]
        print(f"largest relative loss gap to one process, fp16-mixed {strategy}: {max(gaps):.1e}")
        assert max(gaps) < 2e-3  # the ranks' GEMMs add in another order; fp16 rounds that
