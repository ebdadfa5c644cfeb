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


def step(run, x, precision: lowbit.Precision) -> list[torch.Tensor]:
    with precision.autocast():
        out = output(run, x)
    out.float().square().mean().backward()
    return [out] + [p.grad for p in getattr(run, "_orig_mod", run).parameters()]


def assert_one_graph(build, x, precision: lowbit.Precision) -> None:
    """The model ``build(precision)`` makes, run under the recipe's autocast, traces to one graph."""
    torch._dynamo.reset()
    model = build(precision)

    def forward(x):
        with precision.autocast():
            return output(model, x)

    explained = torch._dynamo.explain(forward)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()


def assert_one_graph_with_eager_bits(build, x, precision: lowbit.Precision) -> None:
    assert_one_graph(build, x, precision)
    eager = step(build(precision), x, precision)
    compiled = step(torch.compile(build(precision), backend="aot_eager"), x, precision)
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
