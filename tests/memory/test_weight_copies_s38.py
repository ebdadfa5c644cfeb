"""A converted layer's quantized weight, saved for the backward, is a temporary copy when measured.

`fp8-tensorwise`'s backward reuses the forward's quantized weight (`lowbit.nn.linear`); the estimate
counts it as a temporary low-precision copy (docs/memory.md), and so does `measure_activations`
since session 38. Until then it measured it as an activation: a tagger's table at step 2 read
396,032 bytes of temporary copies estimated, 2,816 measured (the head's bf16 weight only)."""

import torch

import lowbit
from lowbit.memory import measure_activations


def _measured(recipe: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    model = lowbit.Precision(recipe).convert(model)
    x = torch.randn(16, 64)
    return measure_activations(model, lambda: model(x).sum())


def test_reused_quantized_weights_are_measured_as_temporary_copies():
    saved = _measured("fp8-tensorwise")
    # the second layer's weight: the first reads ``x``, which needs no gradient, so it keeps no
    # weight for an input gradient that never runs (session 41)
    weights = 8 * 32
    assert saved.temporaries == 2 * weights + 4  # a bf16 carrier on the CPU, and a scale
    # the inputs stay activations: the first layer's quantized input, the second's
    assert saved.activations == 2 * (16 * 64 + 16 * 32) + 4 * 2
