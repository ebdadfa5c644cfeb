"""DDP: every rank holds the whole model; gradients are all-reduced in the recipe's reduce dtype.

The reduce dtype is the recipe's ``grad_dtype`` when set, else its parameter dtype (fp32 for the
mixed and fp8/MX recipes, bf16/fp16 for the 16-bit-parameter ones). The comm hook casts each
gradient bucket to that dtype when the bucket's differs, all-reduces it and counts the bytes it
sent (`CommStats`, the figures in docs/distributed.md). By default it averages (divides by the
world size), plain DDP's meaning for a loop whose ranks each backpropagate their own mean loss.
`lowbit train` sums instead (``sum_gradients=True``): each rank backpropagates its share of the
global batch's mean loss (`Trainer.step`), so its gradients are those one process computes for
its rows, and their sum is the batch's. Averaged after a backward of each rank's own mean, the
rank's backward held N times one process's gradients, and an fp16 recipe's scaled gradients
overflowed at 1/N of one process's loss scale (extra skipped steps, session 43).

Every recipe is wrapped in `DistributedDataParallel`, the 16-bit-parameter ones included: their
update (`LowPrecisionUpdate`) writes the rounded result into the 16-bit parameters in place, so
the parameters' gradient accumulators, on which DDP hangs its hooks, stay the same objects.

Each ``.grad`` is a view of its all-reduce bucket (``gradient_as_bucket_view=True``), made before
the first step (`grads_as_bucket_views`) and zeroed rather than dropped between steps
(`Ranks.zero_grad`), so that ``--grad-accum``'s micro-batches under ``no_sync`` accumulate into
the buckets too: a rank holds every gradient once (DDP's one rebuild of its buckets, before the
second step's forward, holds the old and the new ones for a moment: `lowbit.memory.estimate`
counts that). Until session 39 it held them
twice for the whole run, ``.grad`` and the buckets' flat copy (4 of bf16-mixed's 20 bytes per
parameter, 146 MiB of a 38M-parameter model's rank; peak RSS in docs/memory.md). Every recipe
trains bit for bit as before (tests/distributed/test_bucket_view_s39.py): lowbit changes
gradients in place (unscaling, clipping) and gives 16-bit parameters' fp32 stand-ins a copy
(`LowPrecisionUpdate.prepare`), never assigning a parameter's ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.recipes.recipe import DTYPES


@dataclass
class CommStats:
    """Gradient all-reduce payload: bytes per rank per call, summed over the run."""

    dtype: torch.dtype
    world_size: int
    group: object = None
    summing: bool = False  # sum the ranks' gradients rather than average them
    bytes: int = 0
    elements: int = 0
    calls: int = 0


def reduce_dtype(recipe) -> torch.dtype:
    return DTYPES[recipe.grad_dtype or recipe.param_dtype]


def _reduce_hook(state: CommStats, bucket):
    import torch.distributed as dist

    buffer = bucket.buffer()
    send = buffer.to(state.dtype) if buffer.dtype != state.dtype else buffer
    if not state.summing:
        send.div_(state.world_size)
    state.bytes += send.numel() * send.element_size()
    state.elements += send.numel()
    state.calls += 1
    future = dist.all_reduce(send, group=state.group, async_op=True).get_future()

    def unpack(done):
        out = done.value()[0]
        if out is not buffer:
            buffer.copy_(out)
        return buffer

    return future.then(unpack)


def grads_as_bucket_views(model) -> None:
    """Gives every trainable parameter without one a zero ``.grad``, before DDP wraps ``model``:
    its reducer makes each existing gradient a view of its bucket as it builds them (copying the
    zeros in; torch's ``Reducer::initialize_bucket_views``), and one that does not exist yet it
    makes a view only at the first synchronised backward. Until session 40, ``--grad-accum``'s
    first micro-batch under ``no_sync`` made gradients of its own beside the buckets, two copies
    of every gradient beside that step's activations (8% over the estimated peak of a DDP rank).
    Adding a micro-batch's gradient to zeros gives it unchanged; DDP without
    ``find_unused_parameters`` gives every trainable parameter a gradient at every step anyway."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def wrap_ddp(model, precision, device: torch.device, sum_gradients: bool = False):
    """(the model for training forwards, its gradient all-reduce `CommStats`). The ranks'
    gradients are averaged, or summed with ``sum_gradients``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    grads_as_bucket_views(model)
    # Buffers (rotary tables) are computed identically on every rank: nothing to broadcast.
    wrapped = DDP(model, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)
    stats = CommStats(reduce_dtype(precision.recipe), dist.get_world_size(), summing=sum_gradients)
    wrapped.register_comm_hook(stats, _reduce_hook)
    return wrapped, stats
