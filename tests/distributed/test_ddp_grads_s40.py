"""Session 40: a DDP rank's gradients are views of DistributedDataParallel's buckets from the first
micro-batch of the first step on, a resumed run's too. Until then every ``.grad`` was None before
the first step, and ``--grad-accum``'s first micro-batch, under ``no_sync``, made gradients of its
own beside the buckets, alive beside the next micro-batch's activations until the synced one
copied them in: a second copy of every gradient (8% over the estimated peak of a rank with 8-bit
optimizer states). A resume dropped the views again (DCP's optimizer-state template)."""

from __future__ import annotations

import torch

from tests.distributed.helpers import TINY, on_ranks


def _fit(out: str, steps: int, resume: bool) -> list[set[int]]:
    """The storages holding the gradients after each micro-batch's backward of a DDP run of two
    micro-batches a step, saved at every step."""
    from lowbit.distributed import Ranks
    from lowbit.train import TrainConfig, Trainer

    config = TrainConfig(
        out=out, strategy="ddp", nproc=2, steps=steps, grad_accum=2, save_interval=1, **TINY
    )
    trainer = Trainer(config, quiet=True, dist=Ranks("ddp", torch.device("cpu")), resume=resume)
    trainer.sample = False
    held, backward = [], trainer.precision.backward

    def counting(loss):
        backward(loss)
        held.append({p.grad.untyped_storage().data_ptr() for p in trainer.model.parameters()})

    trainer.precision.backward = counting
    trainer.fit(resume=resume) if resume else trainer.fit(overwrite=True)
    return held


def _fresh_and_resumed(rank, world, out):
    return _fit(out, 1, resume=False), _fit(out, 2, resume=True)


def test_ddp_gradients_lie_in_the_buckets_from_the_first_micro_batch(tmp_path):
    for fresh, resumed in on_ranks(_fresh_and_resumed, 2, out=str(tmp_path / "run")):
        # one step of two micro-batches each: the first micro-batch's gradients lie where the
        # synchronised one's do (DDP's few flat buckets), not in a storage per parameter
        for held in (fresh, resumed):
            assert len(held) == 2
            assert held[0] == held[1] and len(held[0]) <= 2
