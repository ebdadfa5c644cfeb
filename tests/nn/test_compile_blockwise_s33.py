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
from tests.nn.test_compile_autocast_s32 import assert_one_graph, output
from tests.nn.test_compile_breaks_s32 import nano


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
    """Outputs and gradients of each step, then the trained weights."""
    precision = lowbit.Precision("fp8-blockwise")
    model = build(precision)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    seen = []
    for _ in range(steps):
        with precision.autocast():
            out = output(run, x)
        precision.backward(out.float().square().mean())
        seen += [out.detach()] + [p.grad.clone() for p in model.parameters()]
        precision.step(optimizer)
        optimizer.zero_grad()
    return seen + [p.detach() for p in model.parameters()]


CASES = {
    "nano": (nano, torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))),
    "wide": (wide, torch.randn(640, 640, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("case", CASES)
def test_fp8_blockwise_under_autocast_compiles_to_one_graph_with_the_eager_bits(case):
    build, x = CASES[case]
    assert_one_graph(build, x, lowbit.Precision("fp8-blockwise"))
    eager = train(build, x, compiled=False)
    compiled = train(build, x, compiled=True)
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i
