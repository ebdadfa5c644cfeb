"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, master weights and optimizer states
are sharded; each block is all-gathered for its forward and backward and its gradients are
reduce-scattered: averaged, as plain FSDP2 does, or summed where each rank's backward holds its
share of the global batch's mean loss (``lowbit train``: ``sum_gradients=True``).

The recipe maps onto `MixedPrecisionPolicy`:

- ``param_dtype`` (the dtype parameters are all-gathered and computed in): the recipe's autocast
  dtype (bf16-mixed, fp8, MX: bf16), else its parameter dtype (no cast).
- ``reduce_dtype``: the recipe's ``grad_dtype`` when set, else its parameter dtype (fp32 for the
  fp32-parameter recipes, bf16/fp16 for the 16-bit ones), as under DDP.

fp32-parameter recipes: the sharded parameters are the fp32 master weights, the optimizer states
live beside them, and converted low-precision layers quantize the all-gathered (bf16) weight.

16-bit-parameter recipes (bf16-low, fp16-low, bf16-pure*): the sharded parameters are 16-bit, and
all-gathered as they are. `LowPrecisionUpdate` keeps its fp32 master weights (bf16-low, fp16-low)
and Kahan buffers (bf16-pure-kahan) as DTensors with the parameter's sharding, steps the optimizer
on fp32 shards and rounds the result into each rank's 16-bit shard in place (stochastically for
bf16-pure-sr, with a generator per shard seeded from the stream the ranks share).
"""

from __future__ import annotations

import torch

from lowbit.recipes.recipe import DTYPES


def mixed_precision_policy(precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    recipe = precision.recipe
    if recipe.autocast is not None and not precision.emulates_fp16:
        compute = DTYPES[recipe.autocast]
    else:
        compute = DTYPES[recipe.param_dtype]
    param_dtype = None if compute == torch.float32 else compute
    reduce = DTYPES[recipe.grad_dtype or recipe.param_dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)


def wrap_fsdp(model, precision, device: torch.device, sum_gradients: bool = False):
    """Shard every block of every ``ModuleList`` (transformer layers), then the root; in place.
    The ranks' gradients are averaged, or summed with ``sum_gradients``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(precision)
    sharded = [
        block
        for module in list(model.modules())
        if isinstance(module, torch.nn.ModuleList)
        for block in module
    ]
    for module in [*sharded, model]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # a group of one reduces nothing (no division, no copy)
        if sum_gradients and dist.get_world_size() > 1:
            summing(module)
    return model


def summing(module) -> None:
    """Make the FSDP2 ``module`` sum its ranks' gradients rather than average them: each rank
    backpropagates its share of the global batch's mean loss (`lowbit.train.Trainer.step`), so the
    sum is the global batch's gradient. Plain sums (no PreMulSum, which gloo lacks)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)
