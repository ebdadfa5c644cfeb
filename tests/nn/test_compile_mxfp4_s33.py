"""`torch.compile` of an `mxfp4` model gives eager's weight gradients at every batch size.

Before: with an fp32 input of 640 rows, the compiled step's weight gradients differed from eager's
in bits (8 rows matched). AOTAutograd's partitioner moved the first layer's weight-gradient
quantization of ``x.T`` (which reads only forward tensors) and its stochastic-rounding seed draw
into the forward graph, because saving its bf16 operand (half the bytes of the fp32 ``x``) was
cheaper than saving ``x``; at 8 rows the operand, padded to a 64-wide Hadamard block, was the
larger one and stayed in the backward. The compiled step then drew that seed first, and every
other layer's seed one place later than eager. The traced seed draw is now an op with an ordered
effect (`lowbit.formats.counter_rng`), which stays where it was traced.
"""

import contextlib

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.formats.counter_rng import seed_tensor


def mlp(dropout: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64, bias=False), torch.nn.ReLU()]
    layers += [torch.nn.Dropout(0.1)] if dropout else []
    model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 64, bias=False))
    lowbit.convert(model, "mxfp4")
    return model


def step(model, x):
    torch.manual_seed(1)  # the same dropout masks and stochastic-rounding seeds in both runs
    out = model(x)
    out.square().mean().backward()
    return [out] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
def test_compiled_mxfp4_weight_gradients_match_eager_on_a_large_batch(fused, dropout):
    torch._dynamo.reset()
    x = torch.randn(640, 64, generator=torch.Generator().manual_seed(0))
    with contextlib.nullcontext() if fused else kernels.disabled():
        eager = step(mlp(dropout), x)
        compiled = step(torch.compile(mlp(dropout), backend="aot_eager"), x)
    mismatched = [
        i for i, (a, b) in enumerate(zip(eager, compiled, strict=True)) if not torch.equal(a, b)
    ]
    assert mismatched == [], "output 0, then the weight gradients"


def test_the_traced_seed_is_the_eager_draw():
    """What a traced graph calls for `seed_tensor` draws the same seed from the global generator."""
    torch.manual_seed(5)
    eager = seed_tensor()
    torch.manual_seed(5)
    traced = torch.ops.lowbit_traced.seed()
    assert traced.dtype == torch.int64 and traced.shape == () and torch.equal(traced, eager)
    torch.manual_seed(5)
    assert torch.equal(torch.compile(seed_tensor, backend="aot_eager", fullgraph=True)(), eager)
