"""`torch.compile` of `fp8-blockwise` under its autocast: one graph, the eager bits, step by step.

Before: the traced backward read a stride at three places (the quantization's check for a
row-major copy of a matrix quantized in 128 x 128 tiles, and, with more than four K blocks of 128,
the batched GEMM's block layout and the fused epilogue's check of its output). Dynamo traced that
backward again and left the layer's ``torch.autocast(enabled=False)`` entered, so
`torch._dynamo.explain` failed ("Global autocast(cpu)_enabled state changed while dynamo
tracing") and `torch.compile` traced the rest of the model without autocast: other logits and
gradients than eager (all 13 of the one-layer nano model's).
"""

import pytest
import torch

import lowbit
from tests.nn.test_compile_autocast_s32 import under_autocast
from tests.nn.test_compile_breaks_s32 import nano
from tests.nn.test_compile_s28 import compile_counted, graph_breaks


def wide(precision: lowbit.Precision) -> torch.nn.Module:
    """Five K blocks of 128 in every GEMM (with 640 rows of input): the batched block GEMM, on
    row-major and on column-major (transposed) operands."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(640, 640, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(640, 640, bias=False),
    )
    precision.convert(model)
    return model


def train(build, x, compiled: bool, steps: int = 3) -> list[torch.Tensor]:
    """Outputs and gradients of each step, then the trained weights; compiled, the model traces
    to one graph for all the steps."""
    precision = lowbit.Precision("fp8-blockwise")
    model = build(precision)
    forward = under_autocast(model, precision)
    forward, graphs = compile_counted(forward) if compiled else (forward, None)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    seen = []
    for _ in range(steps):
        out = forward(x)
        precision.backward(out.float().square().mean())
        seen += [out.detach()] + [p.grad.clone() for p in model.parameters()]
        precision.step(optimizer)
        optimizer.zero_grad()
    if compiled:
        assert graphs.frame_count == 1 and not graph_breaks(), (graphs.frame_count, graph_breaks())
    return seen + [p.detach() for p in model.parameters()]


CASES = {
    "nano": (nano, torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))),
    "wide": (wide, torch.randn(640, 640, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("case", CASES)
def test_fp8_blockwise_under_autocast_compiles_to_one_graph_with_the_eager_bits(case):
    build, x = CASES[case]
    torch._dynamo.reset()
    eager = train(build, x, compiled=False)
    compiled = train(build, x, compiled=True)
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i
