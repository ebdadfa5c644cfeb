"""Optimizers with low-precision states (fp32, bf16, fp8, 8-bit, 4-bit) and their byte counts."""

from lowbit.optim.adamw import OPTIMIZERS, Adam, AdamW, AdamWBf16States, build_optimizer
from lowbit.optim.states import (
    BLOCK_SIZE,
    SMALL_TENSOR_NUMEL,
    STATE_PRECISIONS,
    StatePrecision,
    adam_state_bytes,
    keeps_fp32_states,
    state_bytes_per_param,
    state_tensor_bytes,
)

__all__ = [
    "BLOCK_SIZE",
    "OPTIMIZERS",
    "SMALL_TENSOR_NUMEL",
    "STATE_PRECISIONS",
    "Adam",
    "AdamW",
    "AdamWBf16States",
    "StatePrecision",
    "adam_state_bytes",
    "build_optimizer",
    "keeps_fp32_states",
    "state_bytes_per_param",
    "state_tensor_bytes",
]
