"""Quantization error measures shared by tests, diagnostics and reports."""

from __future__ import annotations

import math

import torch

from lowbit.errors import UsageError


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``.

    Computed in float64; ``inf`` when the approximation is exact, ``-inf`` for a zero reference
    with a non-zero error, and ``nan`` if either input has non-finite values.

    The approximation must have the reference's shape or broadcast to it (a scalar, say): one
    that widens it, a ``(n,)`` approximation of an ``(n, 1)`` reference, compared every pair of
    entries and gave a silently wrong figure (3.98 dB for an exact copy of ``[[1], [2]]``).
    """
    try:
        fits = torch.broadcast_shapes(reference.shape, approximation.shape) == reference.shape
    except RuntimeError:  # no common shape at all: torch's text names no sqnr
        fits = False
    if not fits:
        raise UsageError(
            f"sqnr: the approximation's shape {tuple(approximation.shape)} does not match the "
            f"reference's {tuple(reference.shape)}; fix: pass tensors of one shape (e.g. "
            "approximation.reshape(reference.shape))"
        )
    ref = reference.detach().double()
    err = (ref - approximation.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if not (math.isfinite(err) and math.isfinite(signal)):
        return float("nan")
    if err == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * math.log10(signal / err)
