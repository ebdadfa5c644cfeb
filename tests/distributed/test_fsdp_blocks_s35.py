"""Session 35: under FSDP2 a rank holds rows of each weight that are not whole quantization blocks
(48 rows -> 24 a rank for MX's 32-blocks, 40 rows -> 20 for NVFP4's 16x16 weight blocks), yet
each layer quantizes the whole all-gathered weight: the blocks, their scales and values, are one
process's. Weights and inputs are bf16 values, so FSDP's bf16 all-gather changes none."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.helpers import on_ranks

RECIPES = ("mxfp8", "nvfp4")  # nvfp4 keeps the first and last layers: the middle one is NVFP4
WEIGHT_OPERANDS = ("forward.w", "grad_input.w")  # along K (not sharded) and along N (sharded)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 48, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(48, 40, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(40, 24, bias=False),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 3).bfloat16())  # bf16 values: the all-gather in bf16 is exact
    return model


def _weights_quantized(model, recipe: str) -> dict:
    """``operand -> (scale, values)`` of every quantized weight operand in one step of
    ``model`` (converted to ``recipe``, FSDP-wrapped or not)."""
    from lowbit.nn.convert import lowbit_layers
    from lowbit.precision import Precision

    precision = Precision(recipe)
    model = precision.convert(model)
    seen = {}

    def observe(layer, operand, x, q):
        if operand in WEIGHT_OPERANDS:
            seen[f"{layer}:{operand}"] = (q.scale.float().clone(), q.values.float().clone())

    for name, layer in lowbit_layers(model).items():
        layer.lowbit_state.observer = lambda *args, name=name: observe(name, *args)
    return precision, model, seen


def _step(precision, model) -> torch.Tensor:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    with precision.autocast():
        out = model(x)
    precision.backward(out.float().square().mean())
    return out.detach().float()


def _fsdp_and_one_process(rank, world) -> dict:
    """``recipe -> (each weight's rows on this rank, output alone, output sharded, weight
    operands alone, weight operands sharded)``."""
    from lowbit.distributed import Ranks

    ranks, out = Ranks("fsdp", torch.device("cpu")), {}
    for recipe in RECIPES:
        precision, one, alone = _weights_quantized(_model(), recipe)
        torch.manual_seed(7)  # the gradients' stochastic rounding (nvfp4)
        out_alone = _step(precision, one)
        precision, converted, sharded = _weights_quantized(_model(), recipe)
        _, model = ranks.wrap(converted, precision)
        torch.manual_seed(7)
        out_sharded = _step(precision, model)
        rows = [p.to_local().shape[0] for p in model.parameters()]
        out[recipe] = rows, out_alone, out_sharded, alone, sharded
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return on_ranks(_fsdp_and_one_process)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_quantizes_whole_weight_blocks_not_a_rank_s_rows(two_ranks, recipe):
    for rank in two_ranks:
        rows, out_alone, out_sharded, alone, sharded = rank[recipe]
        assert rows == [24, 20, 12]  # no shard is whole blocks along N
        assert alone.keys() == sharded.keys() and len(alone) >= 2
        for operand, (scale, values) in alone.items():
            assert torch.equal(scale, sharded[operand][0]), operand
            assert torch.equal(values, sharded[operand][1]), operand
        assert torch.equal(out_alone, out_sharded)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_rank_s_rows_alone_would_quantize_otherwise(recipe):
    """What the test above would catch: the 20 rows of one rank quantized by themselves give other
    grad_input.w blocks than the whole weight's (the blocks along N split at the shard)."""
    model = _model()
    precision, one, whole = _weights_quantized(model, recipe)
    _step(precision, one)
    layer = 2  # the middle one: nvfp4's NVFP4 layer, and the first has no input gradient
    half = copy.deepcopy(model)
    rows = model[layer].out_features // 2
    half[layer] = torch.nn.Linear(model[layer].in_features, rows, bias=False)
    half[layer].weight.data = model[layer].weight.data[:rows].clone()
    half[layer + 2] = torch.nn.Linear(rows, model[layer + 2].out_features, bias=False)
    half[layer + 2].weight.data = model[layer + 2].weight.data[:, :rows].clone()
    precision, one, shard = _weights_quantized(half, recipe)
    _step(precision, one)
    name = f"{layer}:grad_input.w"
    assert not torch.equal(shard[name][1], whole[name][1][:rows])
