"""DDP: every rank holds the whole model; gradients are all-reduced in the recipe's reduce dtype.

The reduce dtype is the recipe's ``grad_dtype`` when set, else its parameter dtype (fp32 for the
mixed and fp8/MX recipes, bf16/fp16 for the 16-bit-parameter ones). The comm hook divides each
gradient bucket by the world size, casts it to that dtype when the bucket's differs, all-reduces
it and counts the bytes it sent (`CommStats`, the figures in docs/distributed.md).

Recipes with 16-bit parameters are not wrapped: `GradientAllReduce` all-reduces their gradients
in buckets once the backward of a step is done (the same bytes; no overlap with the backward).
This began because `LowPrecisionUpdate` used to swap ``p.data`` to fp32 and back, and a dtype
change of ``p.data`` resets the parameter's gradient accumulator, detaching DDP's hooks after the
first step; the update now writes the 16-bit parameters in place, so the wrapper would work too
(not yet switched or measured).
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
    bytes: int = 0
    elements: int = 0
    calls: int = 0


def reduce_dtype(recipe) -> torch.dtype:
    return DTYPES[recipe.grad_dtype or recipe.param_dtype]


def _reduce_hook(state: CommStats, bucket):
    import torch.distributed as dist

    buffer = bucket.buffer()
    send = buffer.to(state.dtype) if buffer.dtype != state.dtype else buffer
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


class GradientAllReduce:
    """All-reduce (mean) of every gradient after the backward, in buckets of ``bucket_bytes``."""

    def __init__(self, model, stats: CommStats, bucket_bytes: int = 25 * 2**20):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats = stats
        self.bucket_bytes = bucket_bytes

    def __call__(self) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.params if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for i, grad in enumerate(grads):
            bucket.append(grad)
            size += grad.numel() * self.stats.dtype.itemsize
            if size < self.bucket_bytes and i < len(grads) - 1:
                continue
            for group in _by_dtype(bucket):
                flat = _flatten_dense_tensors(group).to(self.stats.dtype)
                flat.div_(self.stats.world_size)
                self.stats.bytes += flat.numel() * flat.element_size()
                self.stats.elements += flat.numel()
                self.stats.calls += 1
                dist.all_reduce(flat, group=self.stats.group)
                for grad_, value in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                    grad_.copy_(value)
            bucket, size = [], 0


def _by_dtype(tensors):
    groups: dict[torch.dtype, list] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def swaps_parameter_data(precision) -> bool:
    return precision.recipe.param_dtype != "fp32"


def wrap_ddp(model, precision, device: torch.device):
    """(the model for training forwards, its `CommStats`, the post-backward reduction or None)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if swaps_parameter_data(precision):
        stats = CommStats(reduce_dtype(precision.recipe), dist.get_world_size())
        for p in model.parameters():  # same start everywhere (the seed makes it so; be sure)
            dist.broadcast(p.data, 0)
        return model, stats, GradientAllReduce(model, stats)

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables) are computed identically on every rank: nothing to broadcast.
    wrapped = DDP(model, device_ids=ids, forward_sync_buffers=False)
    stats = CommStats(reduce_dtype(precision.recipe), dist.get_world_size())
    wrapped.register_comm_hook(stats, _reduce_hook)
    return wrapped, stats, None
