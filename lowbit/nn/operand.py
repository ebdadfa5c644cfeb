"""Quantizing one GEMM operand by its `OperandSpec`, with delayed-scaling state when asked."""

from __future__ import annotations

import torch

from lowbit.formats import Granularity, QTensor, quantize
from lowbit.formats.spec import get
from lowbit.recipes.recipe import DTYPES, OperandSpec, Scaling


class AmaxHistory:
    """Delayed scaling (Transformer Engine): quantize with the max amax of earlier steps.

    The scale of step t comes from ``max(history)`` over the last ``length`` steps; the amax
    measured in step t is held as pending and enters the history when `commit` is called (by
    ``Precision.step``), so every micro-batch of a step uses the same scale. Before the first
    commit the current amax is used (current scaling). Values above the delayed amax saturate.
    """

    def __init__(self, length: int):
        self.history = torch.zeros(length, dtype=torch.float32)
        self.filled = 0
        self.pending: torch.Tensor | None = None

    def scaling_amax(self, current: torch.Tensor) -> torch.Tensor:
        self.pending = current if self.pending is None else torch.maximum(self.pending, current)
        if self.filled == 0:
            return current
        return self.history.max()

    def commit(self) -> None:
        """Roll the history and append this step's amax (called once per optimizer step)."""
        if self.pending is None or not torch.isfinite(self.pending):
            self.pending = None  # an overflowing step does not poison the history
            return
        self.history = torch.roll(self.history, 1)
        self.history[0] = self.pending.detach().float().cpu()
        self.filled = min(self.filled + 1, len(self.history))
        self.pending = None

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].clone().float()
        self.filled = int(state["filled"])
        self.pending = None


def plain_cast(x: torch.Tensor, spec: OperandSpec) -> QTensor:
    """An fp32/bf16/fp16 operand: a dtype conversion (IEEE: overflow gives inf, as on a GPU)."""
    values = x.to(DTYPES[spec.format])
    rows = values.reshape(-1, values.shape[-1]).shape[0] if values.dim() else 1
    return QTensor(
        values=values,
        scale=torch.ones(1, 1, device=x.device),
        fmt=get(spec.format),
        granularity=Granularity.TENSOR,
        block=(max(rows, 1), max(values.shape[-1], 1)),
        axis=-1 % max(values.dim(), 1),
    )


def quantize_operand(
    x: torch.Tensor, spec: OperandSpec, history: AmaxHistory | None = None
) -> QTensor:
    """Quantize a 2-D operand along its last axis (the GEMM's contraction axis)."""
    if spec.is_plain_cast:
        return plain_cast(x, spec)
    amax = None
    if spec.scaling is Scaling.DELAYED and history is not None:
        amax = history.scaling_amax(x.detach().abs().amax().float())
    return quantize(
        x,
        spec.format,
        spec.granularity,
        axis=-1,
        block_size=spec.block_size,
        scale_rule=spec.scale_rule,
        rounding=spec.rounding,
        amax=amax,
    )
