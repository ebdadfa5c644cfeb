"""A converted layer's backward reads the forward's quantized operands as saved tensors.

Where the backward reuses the forward's quantization (tensorwise current scaling: fp8-tensorwise's
input and weight), those quantized tensors travel to the backward through ``save_for_backward``,
so saved-tensor hooks see them: activation checkpointing (built on those hooks) frees and
recomputes them with the rest of a block, and `measure_activations` counts them."""

import torch
from torch.utils.checkpoint import checkpoint

import lowbit
from lowbit.memory import measure_activations


def converted(recipe: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    return lowbit.Precision(recipe).convert(model)


def test_the_reused_quantized_operands_are_saved_tensors():
    model = converted("fp8-tensorwise")
    x = torch.randn(16, 64, requires_grad=True)
    saved = measure_activations(model, lambda: model(x).sum())
    # each layer keeps its input and weight quantized (bf16 carriers on the CPU) and their scales
    carriers = 2 * (16 * 64 + 32 * 64 + 16 * 32 + 8 * 32)
    assert saved.activations >= carriers


def test_checkpointed_layers_with_reused_operands_give_the_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model = converted("fp8-tensorwise")
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        out.float().square().sum().backward()
        grads.append([x.grad, *(p.grad for p in model.parameters())])
    for plain, checkpointed in zip(*grads):
        assert torch.equal(plain, checkpointed)
