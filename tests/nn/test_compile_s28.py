"""`torch.compile` of a converted causal LM: no warning from lowbit's code, no graph break inside
its quantization, and the eager bits.

Before: Dynamo warned at every compile that `axis_quantizer` is wrapped by ``functools.cache``,
and every converted layer's autograd function broke the graph inside `SharedQuantization`
(``x.is_inference()`` read before the is-compiling check; the slot release in the backward a side
effect), 26-31 breaks per forward of the 3-layer nano model; and one more per layer at the
autograd function's call, as Dynamo refuses any `torch.autograd.Function` with a custom ``jvp``
(forward-mode derivatives are now refused before the call, `lowbit.nn.linear._dual`). A converted
model compiles to one graph.
"""

import warnings
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import graph_break_reasons
from transformers import LlamaForCausalLM

import lowbit
from lowbit.models.causal_lm import model_config
from tests.once import once_per_session

LAYERS = 1  # the smallest nano decoder: compiling is slow on a CPU


def nano(recipe: str) -> torch.nn.Module:
    config = model_config("nano", 257)
    config.num_hidden_layers = LAYERS
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lowbit.convert(model, recipe)
    return model


def compile_counted(model: Callable) -> tuple[Callable, CompileCounterWithBackend]:
    """`torch.compile` (``aot_eager``) as a user calls it, and the counter of the graphs it traces
    (``frame_count``): one trace both checks for one graph and gives the compiled bits
    (`torch._dynamo.explain` first traced the model once more, seconds on a CPU). Not
    ``fullgraph``, which puts in the graph some of what breaks it by default (``Tensor.item()``)."""
    graphs = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=graphs), graphs


def graph_breaks() -> list[str]:
    """The reasons of the graph breaks since the last `torch._dynamo.reset`."""
    return [b.reason.splitlines()[0] for b in graph_break_reasons]


def step(model, ids):
    torch.manual_seed(1)  # the same stochastic-rounding seeds in both runs
    logits = model(ids).logits
    logits.square().mean().backward()
    return [logits.detach()] + [p.grad for p in model.parameters()]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def steps(ids, tmp_path_factory):
    """An eager step of the model, then (its gradients cleared) a compiled one: their bits, and
    the compiled one's warnings, graph count and graph breaks, for the module's tests (one trace
    for both, once per session)."""
    return once_per_session(tmp_path_factory, "compile-s28", lambda: _steps(ids))


def _steps(ids):
    torch._dynamo.reset()
    model = nano("fp8-tensorwise")
    eager = step(model, ids)  # an eager step first, as in training: kernels built, state filled
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, graphs = compile_counted(model)
        compiled = step(compiled, ids)
    return eager, compiled, (graphs.frame_count, graph_breaks()), [str(w.message) for w in caught]


def test_compiling_a_converted_model_warns_nothing_and_breaks_no_graph_in_quantization(steps):
    _, _, graphs, messages = steps
    assert not [m for m in messages if "lru_cache" in m], messages
    assert graphs == (1, [])  # one graph, no break (25 in this 1-layer model before)


def test_a_compiled_converted_nano_model_gives_the_eager_bits(steps):
    """The logits and every gradient, the embedding's too (across graph breaks it summed its two
    gradients, residual and first norm, in another order: its last bits differed)."""
    eager, compiled, _, _ = steps
    names = ["logits"] + [name for name, _ in nano("fp8-tensorwise").named_parameters()]
    for name, a, b in zip(names, eager, compiled, strict=True):
        assert torch.equal(a, b), name
