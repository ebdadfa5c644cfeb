"""Session 39: a DDP rank (`lowbit train --nproc N`) holds every gradient once. Each ``.grad`` is a
view of DistributedDataParallel's all-reduce buckets, kept (zeroed) between steps, so that
``--grad-accum``'s micro-batches under ``no_sync`` accumulate into the buckets too; until then
``.grad`` was a copy beside the buckets, 4 of bf16-mixed's 20 bytes per parameter per rank.
Training is bit for bit what it was with the copy."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import TINY, on_ranks

# 16-bit parameters with fp32 master weights, loss scaling with the first step overflowed and
# skipped (a scale of 2^17), gradients accumulated over two micro-batches, clipped (1.0)
CASE = {"recipe": "fp16-low", "loss_scale": 2.0**17, "grad_accum": 2, "steps": 3}


def _copying_ddp(patch: pytest.MonkeyPatch) -> None:
    """lowbit's DDP until session 39, the reference: ``.grad`` a copy beside the buckets, dropped
    at every step."""
    import torch.nn.parallel as parallel

    from lowbit.distributed.context import Ranks

    class CopyingDDP(parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "gradient_as_bucket_view": False})

    patch.setattr(parallel, "DistributedDataParallel", CopyingDDP)
    patch.setattr(Ranks, "zero_grad", lambda self, opt: opt.zero_grad(set_to_none=True))


def _fit(out: str) -> dict:
    from lowbit.distributed import Ranks
    from lowbit.train import TrainConfig, Trainer

    config = TrainConfig(
        out=out, strategy="ddp", nproc=2, warmup_steps=0, min_lr=TINY["lr"], **TINY, **CASE
    )
    trainer = Trainer(config, quiet=True, dist=Ranks("ddp", torch.device("cpu")))
    trainer.sample = False
    held, backward = [], trainer.precision.backward

    def counting(loss):  # the storages holding the gradients after each micro-batch's backward
        backward(loss)
        grads = [p.grad for p in trainer.model.parameters()]
        held.append(len({g.untyped_storage().data_ptr() for g in grads}))

    trainer.precision.backward = counting
    trainer.fit(overwrite=True)
    states = [s[k] for s in trainer.optimizer.state.values() for k in sorted(s)]
    masters = trainer.precision.state_dict()["update"]["masters"].values()
    return {
        "held": held,
        "gradients": len(list(trainer.model.parameters())),
        "values": [t.detach().clone() for t in [*trainer.model.parameters(), *masters, *states]],
        "skipped": int(trainer.precision.skipped_steps),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # -0.0 and 0.0 apart


def _both(rank, world, out):
    now = _fit(f"{out}/now")
    with pytest.MonkeyPatch.context() as patch:
        _copying_ddp(patch)
        before = _fit(f"{out}/before")
    return now, before


@pytest.mark.slow  # four 3-step runs of two ranks in fp16 emulation: a minute on a busy machine
def test_ddp_ranks_hold_each_gradient_once_and_train_as_with_the_copy(tmp_path):
    for now, before in on_ranks(_both, 2, out=str(tmp_path)):
        assert now["skipped"] == before["skipped"] == 1
        # from the second step on (the first backward makes the views), every micro-batch's
        # gradients lie in the few flat buckets (one per dtype and 25 MB), the first of two
        # included; with the copy, each in a storage of its own
        assert max(now["held"][CASE["grad_accum"] :]) <= 2
        assert before["held"] == [before["gradients"]] * CASE["grad_accum"] * CASE["steps"]
        assert len(now["values"]) == len(before["values"])
        for a, b in zip(now["values"], before["values"], strict=True):
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
