"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, master weights and optimizer states
are sharded; each block is all-gathered for its forward and backward and its gradients are
reduce-scattered.

The recipe maps onto `MixedPrecisionPolicy`:

- ``param_dtype`` (the dtype parameters are all-gathered and computed in): the recipe's autocast
  dtype (bf16-mixed, fp8, MX: bf16), else its 16-bit parameter dtype, else fp32 (no cast).
- ``reduce_dtype``: the recipe's ``grad_dtype`` when set, else fp32.

The sharded parameters keep the recipe's parameter dtype, so fp32-parameter recipes hold sharded
fp32 master weights, and 16-bit-parameter recipes with master weights keep their fp32 masters
beside the shards (one shard each). Converted low-precision layers see the all-gathered weight
and quantize it as in one process.
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError
from lowbit.recipes.recipe import DTYPES, UpdateRounding


def mixed_precision_policy(precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    recipe = precision.recipe
    if recipe.autocast is not None and not precision.emulates_fp16:
        compute = DTYPES[recipe.autocast]
    else:
        compute = DTYPES[recipe.param_dtype]
    param_dtype = None if compute == torch.float32 else compute
    reduce = DTYPES[recipe.grad_dtype] if recipe.grad_dtype else torch.float32
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)


def check_recipe(recipe) -> None:
    if recipe.update_rounding is not UpdateRounding.NEAREST:
        raise UsageError(
            f"recipe {recipe.name}: {recipe.update_rounding.value} update rounding is not "
            "supported with --strategy fsdp; fix: use --strategy ddp"
        )


def wrap_fsdp(model, precision, device: torch.device):
    """Shard every block of every ``ModuleList`` (transformer layers), then the root; in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_recipe(precision.recipe)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(precision)
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
