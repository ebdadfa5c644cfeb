"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, master weights and optimizer states
are sharded; each block is all-gathered for its forward and backward and its gradients are
reduce-scattered.

The recipe maps onto `MixedPrecisionPolicy`:

- ``param_dtype`` (the dtype parameters are all-gathered and computed in): the recipe's autocast
  dtype (bf16-mixed, fp8, MX: bf16), else its 16-bit parameter dtype, else fp32 (no cast).
- ``reduce_dtype``: the recipe's ``grad_dtype`` when set, else fp32.

The sharded parameters are the recipe's fp32 parameters, so they are the sharded master weights,
and the optimizer states live beside them, sharded too. Converted low-precision layers see the
all-gathered (bf16) weight and quantize it. Recipes with 16-bit parameters are refused
(`check_recipe`).
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError
from lowbit.recipes.recipe import DTYPES


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
    """16-bit-parameter recipes swap ``p.data`` for the update (master weights, SR, Kahan), which
    FSDP's sharded storage does not follow: they train with DDP."""
    if recipe.param_dtype != "fp32":
        raise UsageError(
            f"recipe {recipe.name} ({recipe.param_dtype} parameters) is not supported with "
            "--strategy fsdp; fix: use --strategy ddp, or bf16-mixed (FSDP then shards fp32 "
            "master weights and computes in bf16)"
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
