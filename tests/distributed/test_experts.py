"""Mixture-of-experts layers on two gloo ranks: each rank routes its own tokens, so an expert may
get tokens on one rank and none on the other; the ranks still agree on every expert's scales
(and do not hang waiting for each other's all-reduces)."""

from __future__ import annotations

import torch

from tests.distributed.helpers import on_ranks
from tests.moe import mixtral_config, randomized

RECIPES = ("fp8-tensorwise", "fp8-rowwise", "nvfp4")
IDLE_ON_RANK_0 = 2  # rank 0 routes no token to this expert


def _experts():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return randomized(MixtralExperts(mixtral_config(hidden_size=32, intermediate_size=48)))


def _scales_on_two_ranks(rank, world):
    from lowbit.distributed import Ranks
    from lowbit.nn.experts import LowbitExperts
    from lowbit.recipes import get_recipe

    Ranks("ddp", torch.device("cpu"))  # installs the ranks' scale agreement
    out = {}
    for recipe in RECIPES:
        layer = LowbitExperts(_experts(), get_recipe(recipe).layer)
        seen = {}
        for kind, gemms in layer.gemms.items():
            for e, gemm in enumerate(gemms):

                def observe(operand, x, q, name=f"{kind}.{e}", seen=seen):
                    tensor = q.scale if q.tensor_scale is None else q.tensor_scale
                    seen[f"{name}:{operand}"] = tensor.clone()

                gemm.lowbit_state.observer = observe
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(world * 16, 32, generator=g)[rank * 16 : (rank + 1) * 16]
        scores = torch.randn(world * 16, 4, generator=g)[rank * 16 : (rank + 1) * 16]
        if rank == 0:
            scores[:, IDLE_ON_RANK_0] = -torch.inf
        weights, index = scores.softmax(-1).topk(2, dim=-1)
        hidden = (hidden * (1 + 3 * rank)).requires_grad_()  # the ranks' ranges differ
        layer(hidden, index, weights).square().sum().backward()
        out[recipe] = seen
    return out


def test_every_rank_runs_and_agrees_on_every_experts_scales():
    rank0, rank1 = on_ranks(_scales_on_two_ranks, 2, timeout=120)
    for recipe in RECIPES:
        a, b = rank0[recipe], rank1[recipe]
        assert a.keys() == b.keys(), recipe  # rank 0 ran the idle expert's GEMMs too
        assert any(k.startswith(f"up.{IDLE_ON_RANK_0}:") for k in a), recipe
        # scales spanning the batch are agreed; per-token rows (fp8-rowwise's forward.x and
        # input-gradient rows) are each rank's own, and weights are the same anyway
        own = ("forward.x", "grad_input.grad_out") if recipe == "fp8-rowwise" else ()
        agreed = [k for k in a if not k.endswith((".w", *own))]
        assert agreed, recipe
        differing = [k for k in agreed if not torch.equal(a[k], b[k])]
        assert not differing, (recipe, differing)
