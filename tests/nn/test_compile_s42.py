"""`torch.compile` of a converted CNN: one graph, no warning, no recompile, the eager bits.

Before: every converted convolution broke the graph at its unfold (Dynamo refuses to trace an
autograd function with a custom ``jvp``: "Unsupported custom jvp", 2 breaks and 5 graphs for the
digits CNN's two convolutions), and Dynamo warned at each compile that it ignores the
``functools.lru_cache`` of the backward's `_segments`. The forward-mode rule is now taken only
under torch.func's transforms or for a dual tensor (tests/nn/test_conv_hunt_s28.py keeps their
one-line refusals), and the cache is `lowbit.dynamo_marks.cache`, which a trace does not read: a
cache read in the trace guarded the graph on its contents, so a model compiled before its first
eager step was compiled again at the step after an eager one (int8's `axis_quantizer` too).
"""

import warnings

import torch
from torch import nn

import lowbit
from tests.nn.test_compile_s28 import compile_counted, graph_breaks


def converted_net() -> nn.Module:
    """Two convolutions of shapes no other test uses (a 9 x 7 image, a dilated kernel), so that
    no cache holds their unfolding's answers yet, as in a new process."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 9 * 7, 10),
    )
    lowbit.convert(model, "fp8-tensorwise")
    return model


def step(model, images) -> list[torch.Tensor]:
    out = model(images)
    out.square().mean().backward()
    module = getattr(model, "_orig_mod", model)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return [out.detach(), *grads]


def test_a_converted_cnn_compiles_once_to_one_graph_without_warnings_with_the_eager_bits():
    torch._dynamo.reset()
    images = torch.randn(4, 1, 9, 7, generator=torch.Generator().manual_seed(0))
    eager_net = converted_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, graphs = compile_counted(converted_net())
        compiled = step(model, images)  # compiled first, then eager: the caches filled now
        eager = step(eager_net, images)
        compiled_again = step(model, images)
    assert (graphs.frame_count, graph_breaks()) == (1, []), (graphs.frame_count, graph_breaks())
    assert not [str(w.message) for w in caught]
    for i, (a, b, c) in enumerate(zip(eager, compiled, compiled_again, strict=True)):
        assert torch.equal(a, b) and torch.equal(a, c), i
