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
    assert saved.activations + saved.temporaries >= carriers  # the weights: temporary copies


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


class ThreeReaders(torch.nn.Module):
    """Three layers reading one input, as a block's q, k and v projections do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(64, 32, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


def test_int8_keeps_one_bf16_cast_of_an_input_for_its_weight_gradients():
    """int8's weight gradients are bf16 GEMMs of the input: the forward casts an fp32 input once
    for the layers that read it and the backward keeps that cast (2 bytes an element) instead
    of the input (4), with the same gradients as casting it in the backward."""
    torch.manual_seed(0)
    model = ThreeReaders()
    reference = ThreeReaders()
    reference.load_state_dict(model.state_dict())
    lowbit.Precision("int8").convert(model)
    x = torch.randn(16, 64, requires_grad=True)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().sum()

    kept = measure_activations(model, forward).activations
    assert kept < 16 * 64 * 4  # not the fp32 input itself
    assert kept >= 16 * 64 * 2  # its bf16 cast (with the int8 operands' scales)
    forward().backward()
    grad_q = model.q.weight.grad
    torch.manual_seed(0)  # the weight gradient as plain PyTorch computes it in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference.q(x.detach())
    out.float().sum().backward()
    assert torch.equal(grad_q, reference.q.weight.grad)
