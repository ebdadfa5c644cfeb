"""Quantization error measures shared by tests, diagnostics and reports."""

from __future__ import annotations

import math

import torch


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``.

    Computed in float64; ``inf`` when the approximation is exact, ``-inf`` for a zero reference
    with a non-zero error, and ``nan`` if either input has non-finite values.
    """
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
