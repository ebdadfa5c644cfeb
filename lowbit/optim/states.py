"""Optimizer-state precisions and their exact byte counts.

Adam keeps two states per parameter, the first moment ``m`` and the second moment ``v``, plus a
scalar step counter. Their storage per state element:

============  =====================================================  ===========================
precision     storage                                                bytes/param (2 states)
============  =====================================================  ===========================
``fp32``      fp32                                                   8
``bf16``      bf16, written with stochastic rounding (unbiased)      4
``fp8``       fp8 e4m3 codes + one fp32 scale per 256 values          2 + 2*4/256 = 2.03
``8bit``      8-bit dynamic-map codes + fp32 scale per 256 values     2 + 2*4/256 = 2.03
              + a 256-entry fp32 code map per state tensor (Dettmers et al. 2021)
``4bit``      4-bit codes (two per byte) + fp32 scale per 128 values  1 + 2*4/128 = 1.06
              + a 16-entry fp32 code map per state tensor (Li et al. 2023)
============  =====================================================  ===========================

The ``fp8``/``8bit``/``4bit`` layouts are torchao's (``torchao.optim``), whose defaults these block
sizes are. Small tensors keep fp32 states (`keeps_fp32_states`): norm weights and biases are a
tiny share of the memory, and quantizing their states hurts most (bitsandbytes' ``min_8bit_size``
of 4096, which torchao follows).
"""

from __future__ import annotations

from enum import Enum

from lowbit.errors import UsageError, choose


class StatePrecision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "8bit"
    INT4 = "4bit"


STATE_PRECISIONS: tuple[str, ...] = tuple(s.value for s in StatePrecision)

# Tensors with fewer elements keep fp32 states (bitsandbytes min_8bit_size = 4096; torchao's rule).
SMALL_TENSOR_NUMEL = 4096

# torchao.optim defaults: AdamW8bit/AdamWFp8 block_size=256, AdamW4bit block_size=128.
BLOCK_SIZE = {StatePrecision.FP8: 256, StatePrecision.INT8: 256, StatePrecision.INT4: 128}
_CODE_BITS = {StatePrecision.FP8: 8, StatePrecision.INT8: 8, StatePrecision.INT4: 4}
# Code maps: one fp32 lookup table per quantized state tensor (fp8 needs none).
_QMAP_ENTRIES = {StatePrecision.FP8: 0, StatePrecision.INT8: 256, StatePrecision.INT4: 16}
_SCALE_BYTES = 4  # fp32 block scale
STEP_BYTES = 4  # the per-parameter step counter: a 0-dim fp32 tensor (torch and torchao)
ADAM_STATES = 2  # exp_avg, exp_avg_sq


def state_precision(
    name: str | StatePrecision,
    fix: str = "--optimizer-state fp32 (the default), or another of those",
) -> StatePrecision:
    """``name`` as a `StatePrecision`; an unknown one is a `UsageError` listing the valid names
    and ``fix``, how the caller's user gives one (the flag; `build_optimizer` its argument)."""
    choose("optimizer state precision", name, STATE_PRECISIONS, fix=fix)
    return StatePrecision(name)


def keeps_fp32_states(precision: str | StatePrecision, numel: int) -> bool:
    """Whether a tensor of ``numel`` elements keeps fp32 states under ``precision``.

    The rule is decided on the *global* tensor (``param.numel()``, which for a sharded DTensor is
    the unsharded count), never on a shard, so every rank of an FSDP run agrees on it and the
    memory estimate of a sharded run is the unsharded one divided by the number of ranks: a tensor
    keeps fp32 states when ``numel < 4096`` or, for block-quantized states, when ``numel`` is not a
    multiple of the block size (torchao's blocks never straddle the tensor's end).
    """
    precision = state_precision(precision)
    if precision is StatePrecision.FP32:
        return True
    if numel < SMALL_TENSOR_NUMEL:
        return True
    block = BLOCK_SIZE.get(precision)
    return block is not None and numel % block != 0


def state_tensor_bytes(precision: str | StatePrecision, numel: int) -> int:
    """Exact bytes of one Adam state tensor (``exp_avg`` or ``exp_avg_sq``) of ``numel`` values."""
    precision = state_precision(precision)
    if keeps_fp32_states(precision, numel):
        return 4 * numel
    if precision is StatePrecision.BF16:
        return 2 * numel
    codes = numel * _CODE_BITS[precision] // 8
    scales = numel // BLOCK_SIZE[precision] * _SCALE_BYTES
    return codes + scales + 4 * _QMAP_ENTRIES[precision]


def adam_state_bytes(precision: str | StatePrecision, numel: int) -> int:
    """Exact bytes of Adam's state for one parameter tensor: two moments and the step counter."""
    return ADAM_STATES * state_tensor_bytes(precision, numel) + STEP_BYTES


def state_bytes_per_param(precision: str | StatePrecision, numel: int) -> float:
    """Adam's two moments in bytes per parameter for a tensor of ``numel`` values (block scales
    and code maps included; the 4-byte step counter, one per tensor, is not)."""
    if numel <= 0:
        raise UsageError(f"numel must be positive, got {numel}")
    return ADAM_STATES * state_tensor_bytes(precision, numel) / numel
