"""`torch.compile` of fp8 and MX recipes under their autocast: one graph, the eager bits.

Before: every bias-free layer of `fp8-tensorwise` and `fp8-delayed` with a bf16 output (each Llama
projection under autocast) broke the graph at ``scale.item()`` (addmm's alpha). And a layer whose
forward traced whole had its backward traced at once: Dynamo refuses to read a stride there, traces
the backward again, and left the layer's ``torch.autocast(enabled=False)`` entered, so
`torch._dynamo.explain` failed ("Global autocast(cpu)_enabled state changed while dynamo
tracing") and `torch.compile` traced the rest of the model without autocast (`mxfp8` here).
"""

import pytest
import torch

import lowbit
from tests.nn.test_compile_breaks_s32 import nano
from tests.nn.test_compile_s28 import compile_counted, graph_breaks


def mlp(precision: lowbit.Precision) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64, bias=False), torch.nn.ReLU(), torch.nn.Linear(64, 64, bias=False)
    )
    precision.convert(model)
    return model


def output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def under_autocast(model, precision: lowbit.Precision):
    """The model's output under the recipe's autocast, entered inside what is compiled: a trace
    that leaves autocast as it was not fails Dynamo's check of the global state."""

    def forward(x):
        with precision.autocast():
            return output(model, x)

    return forward


def step(forward, model, x) -> list[torch.Tensor]:
    out = forward(x)
    out.float().square().mean().backward()
    return [out] + [p.grad for p in model.parameters()]


def assert_one_graph_with_eager_bits(build, x, precision: lowbit.Precision) -> None:
    """The model ``build(precision)`` makes, compiled and run under the recipe's autocast, traces
    to one graph and gives eager's output and gradients."""
    torch._dynamo.reset()
    model = build(precision)
    eager = step(under_autocast(model, precision), model, x)
    model = build(precision)
    forward, graphs = compile_counted(under_autocast(model, precision))
    compiled = step(forward, model, x)
    assert graphs.frame_count == 1 and not graph_breaks(), (graphs.frame_count, graph_breaks())
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-delayed"])
def test_nano_under_fp8_tensorwise_autocast_is_one_graph_with_the_eager_bits(recipe):
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    assert_one_graph_with_eager_bits(nano, ids, lowbit.Precision(recipe))


def test_a_traced_backward_under_autocast_leaves_autocast_as_it_was():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    assert_one_graph_with_eager_bits(mlp, x, lowbit.Precision("mxfp8"))


def test_an_fp8_tensorwise_layer_under_autocast_exports_with_the_eager_bits():
    """`torch.export` failed there too: it cannot read addmm's alpha from the scale (a
    data-dependent error)."""
    precision = lowbit.Precision("fp8-tensorwise")
    model = mlp(precision)

    class UnderAutocast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            with precision.autocast():
                return self.model(x)

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = torch.export.export(UnderAutocast(), (x,))
        assert torch.equal(exported.module()(x), UnderAutocast()(x))
