"""`torch.compile` of a model whose backward rounds stochastically (`mxfp4`): one graph, the eager
bits.

Before: every converted layer's backward turned its stochastic-rounding seed into a Python int
(``int(torch.randint(...))``, `lowbit.formats.counter_rng.draw_seed`), a graph break inside the
layer's autograd function, so Dynamo ran each layer's whole autograd function eagerly (2 breaks
per layer of this model). The seed now stays a 0-dim tensor in the graph
(`lowbit.formats.counter_rng.seed_tensor`; `lowbit_traced::quantize_rows` for the fused kernel).

Eager and compiled draw the same seeds in the same order, so they give the same bits, as here,
where no two layers read one input. Where layers do (a transformer's q, k and v projections),
eager shares one stochastic rounding of that input between them (`SharedQuantization`), which a
traced graph cannot, so a compiled model rounds each layer's copy with its own draw: equally
unbiased, other bits.
"""

import contextlib

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.formats.hadamard import random_signs, transform
from tests.nn.test_compile_s28 import compile_counted, graph_breaks


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    lowbit.convert(model, "mxfp4")
    return model


def step(model, x):
    torch.manual_seed(1)  # the same stochastic-rounding seeds in both runs
    out = model(x)
    out.square().mean().backward()
    return [out] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
def test_a_stochastically_rounding_model_compiles_to_one_graph_with_the_eager_bits(fused):
    torch._dynamo.reset()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with contextlib.nullcontext() if fused else kernels.disabled():
        model = mlp()
        eager = step(model, x)  # an eager step first, as in training (see the last test)
        model.zero_grad()
        compiled, graphs = compile_counted(model)
        compiled = step(compiled, x)
    assert graphs.frame_count == 1 and not graph_breaks(), (graphs.frame_count, graph_breaks())
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


def test_hadamard_signs_drawn_inside_a_compiled_function_break_no_graph():
    """`random_signs` made a `torch.Generator`, which breaks a traced graph: a model compiled
    before its first eager step drew each `mxfp4` layer's signs there, in its backward."""
    torch._dynamo.reset()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(lambda t: transform(t, random_signs(64, 7)), fullgraph=True)
    assert torch.equal(compiled(x), transform(x, random_signs(64, 7)))


def test_the_traced_quantization_op_matches_its_fake_and_the_kernel():
    """`lowbit_traced::quantize_rows` (what a traced graph calls for stochastic rounding) against
    its fake implementation, and bit for bit against the C++ op with the seed as an int."""
    assert kernels.available(), kernels.build_error()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    args = (x, 32, 1, 0, 1, 0, 2, 6.0, 2, None)  # fp4 e2m1, 32-blocks, OCP floor scale
    rest = (False, None, True, False)
    seed = torch.tensor(12345)
    traced = torch.ops.lowbit_traced.quantize_rows
    torch.library.opcheck(traced, (*args, seed, *rest))
    for a, b in zip(
        traced(*args, seed, *rest), torch.ops.lowbit.quantize_rows(*args, 12345, *rest)
    ):
        assert torch.equal(a, b)
