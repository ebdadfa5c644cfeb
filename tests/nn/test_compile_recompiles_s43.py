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
from lowbit import kernels
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
    """Least recently used, not first in: the oldest answer, asked for again, outlives a newer
    one that nobody asked for since."""

    class Answer:
        pass

    calls = []

    @cache
    def answer(key):
        calls.append(key)
        return Answer()

    oldest, newer = answer(0), answer(1)
    kept, dropped = weakref.ref(oldest), weakref.ref(newer)
    for key in range(2, MOST_ANSWERS):
        answer(key)
    assert answer(0) is oldest  # full now; asking for 0 makes 1 the least recently used
    del oldest, newer
    answer(MOST_ANSWERS)  # one answer more than it keeps
    gc.collect()
    assert kept() is not None and dropped() is None
    assert answer(0) is kept() and calls.count(0) == 1
    answer(1)
    assert calls.count(1) == 2  # computed again


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_the_row_block_rounds_stochastically_as_a_block_of_the_row(transposed, integer):
    """The C++ op with `kernels.ROW_BLOCK` (one scale per row) and a seed draws the noise that a
    block of the row's length draws: its rows' draws were 2**62 apart before, an int64
    overflow, and only the Python wrapper passed the row's length instead."""
    assert kernels.available(), kernels.build_error()
    x = torch.randn(37, 40, generator=torch.Generator().manual_seed(3))
    x = x.t().contiguous().t() if transposed else x
    fmt = (1, 0, 0, 0, 127.0) if integer else (0, 3, -6, 8, 448.0)  # int8, fp8_e4m3
    fold = not integer  # the folded operand too (float formats only)

    def rows(block):
        return torch.ops.lowbit.quantize_rows(
            x, block, 1, *fmt, 0, None, 7, fold, None, True, False
        )

    by_row, by_length = rows(kernels.ROW_BLOCK), rows(x.shape[1])
    nearest = torch.ops.lowbit.quantize_rows(
        x, x.shape[1], 1, *fmt, 0, None, None, fold, None, True, False
    )
    assert not torch.equal(by_length[0], nearest[0])  # the seed rounds some values otherwise
    for want, got in zip(by_length, by_row, strict=True):
        assert torch.equal(want, got)
