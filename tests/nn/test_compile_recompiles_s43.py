"""`torch.compile` of a converted model at several batch sizes: one graph for the first size and
one dynamic graph for every later one, as for a plain `nn.Linear` model, with the eager bits.

Before: an `fp8-rowwise` model compiled a graph for every batch size (the C++ op's ``int block``,
a row's length, is the batch's token count in a weight gradient's ``grad_out.T``: Dynamo
specialized it), until Dynamo's recompile limit; `mxfp8` and `fp8-blockwise` guarded on whether
the token count is a whole number of blocks, one more graph. And `lowbit.dynamo_marks.cache`
kept every answer it was asked for, one per shape met, for the life of the process.
"""

import gc
import weakref

import pytest
import torch

import lowbit
from lowbit.dynamo_marks import MOST_ANSWERS, cache
from lowbit.formats import quantize
from tests.nn.test_compile_s28 import compile_counted, graph_breaks

# Tokens per batch: 64, 48, 128: whole blocks of 32 (`mxfp8`), not, and whole blocks of 128
# (`fp8-blockwise`). Each above one MX block (up to 32 tokens is another graph, docs/recipes.md).
BATCHES = (4, 3, 8)
SEQUENCE = 16


def mlp(recipe: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    if recipe is not None:
        lowbit.convert(model, recipe)
    return model


def step(model, batch: int) -> list[torch.Tensor]:
    """Output and gradients (input's, parameters') of one step on a batch of ``batch`` rows."""
    x = torch.randn(batch, SEQUENCE, 64, generator=torch.Generator().manual_seed(batch))
    x.requires_grad_()
    out = model(x)
    out.float().square().mean().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return [out.detach(), *grads]


def graphs_per_batch(recipe: str | None) -> tuple[list[int], list[list[torch.Tensor]]]:
    """The graphs compiled after each batch size of `BATCHES`, and each step's results."""
    torch._dynamo.reset()
    model = mlp(recipe)
    run, graphs = compile_counted(model)
    counts, results = [], []
    for batch in BATCHES:
        results.append(step(run, batch))
        counts.append(graphs.frame_count)
    assert not graph_breaks(), graph_breaks()
    return counts, results


@pytest.mark.slow  # compiles twice: ~5 s (2 busy cores)
def test_a_plain_model_compiles_once_static_then_once_dynamic():
    """The reference the converted models are held to (torch's automatic dynamic shapes)."""
    assert graphs_per_batch(None)[0] == [1, 2, 2]


@pytest.mark.slow  # compiles twice, forward and backward: ~10 s each (2 busy cores)
@pytest.mark.parametrize("recipe", ["fp8-rowwise", "mxfp8", "fp8-blockwise"])
def test_a_converted_model_compiles_no_graph_per_batch_size(recipe):
    counts, compiled = graphs_per_batch(recipe)
    assert counts == [1, 2, 2]
    model = mlp(recipe)
    for batch, got in zip(BATCHES, compiled, strict=True):
        for want, have in zip(step(model, batch), got, strict=True):
            assert torch.equal(want, have), (recipe, batch)


def test_a_stochastically_rounded_row_quantization_compiles_no_graph_per_row_length():
    """One scale per row with stochastic rounding: the traced op takes the row's length, the
    draws' stride, as a symbolic size (it specialized it before)."""

    def rows_of(x):
        q = quantize(x.t(), "fp8_e4m3", "axis", rounding="stochastic")
        return q.values, q.scale

    torch._dynamo.reset()
    run, graphs = compile_counted(rows_of)
    counts = []
    for tokens in (40, 24, 56):
        x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(tokens))
        torch.manual_seed(1)
        want = rows_of(x)
        torch.manual_seed(1)
        got = run(x)
        counts.append(graphs.frame_count)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), tokens
    assert counts == [1, 2, 2]


def test_the_cache_keeps_the_answers_last_used_and_drops_the_rest():
    class Answer:
        pass

    calls = []

    @cache
    def answer(key):
        calls.append(key)
        return Answer()

    first = answer(0)
    kept = weakref.ref(first)
    assert answer(0) is first and calls == [0]
    del first
    for key in range(1, MOST_ANSWERS + 1):
        answer(key)
    gc.collect()
    assert kept() is None  # the least recently used answer went
    latest = answer(MOST_ANSWERS)
    assert answer(MOST_ANSWERS) is latest and calls.count(MOST_ANSWERS) == 1
