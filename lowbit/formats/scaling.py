"""Scaled quantization: how a tensor is cut into blocks and how each block's scale is chosen.

A tensor is quantized along one ``axis`` (in training, a GEMM's contraction axis). The axis is moved
last and the other dimensions are flattened into rows, giving an ``R x C`` matrix; a granularity is
then a block shape ``(br, bc)`` on that matrix, and every block shares one scale ``s``:

    values = cast(x / s, fmt)          dequantized = values * s

==============  =====================  ===========================================================
granularity     block (rows x cols)    scale
==============  =====================  ===========================================================
``tensor``      R x C                  one fp32 scale for the whole tensor
``axis``        1 x C                  one scale per row, i.e. per slice along ``axis``
``block``       1 x b                  1-D tiles along ``axis`` (DeepSeek-V3's 1x128)
``block2d``     b0 x b1                2-D tiles (DeepSeek-V3's 128x128 weight blocks)
``mx``          1 x 32                 e8m0 power-of-two scale, OCP MX v1.0 rules
``nvfp4``       1 x 16 (or 16 x 16)    fp8_e4m3 block scale times an fp32 per-tensor scale
==============  =====================  ===========================================================

Scale rules (``ScaleRule``) for a block with largest magnitude ``amax`` and a format whose largest
value is ``max``:

- ``amax``:  ``s = amax / max`` in fp32: the block's largest value lands exactly on ``max``.
- ``pow2``:  ``s = 2**ceil(log2(amax / max))``: the smallest power of two that avoids saturation;
  dequantization is then exact multiplication by a power of two.
- ``mx_floor`` (OCP MX v1.0 §6.3): ``s = 2**(floor(log2(amax)) - emax_elem)`` with ``emax_elem`` the
  exponent of the element format's largest binade (e4m3: 8, e5m2: 15, e3m2: 4, e2m3: 2, e2m1: 2),
  clamped to e8m0's range [-127, 127]. The block maximum may exceed ``max`` after scaling (by up to
  2x less an ulp) and then saturates: the spec's behaviour.
- ``mx_ceil``: the round-up variant, ``s = 2**ceil(log2(amax / max))`` clamped to e8m0's range,
  which never saturates (torchao's ``RCEIL``).

Granularity ``mx`` under ``amax`` is a deliberate variant, not an OCP MX format: 1 x 32 blocks with
fp32 scales (no e8m0 value), to compare scale rules at MX's block size; under ``pow2`` the scales
are ``mx_ceil``'s but for a non-finite block (its amax as the scale, not NaN).

NVFP4 (NVIDIA, "Pretraining LLMs with NVFP4", 2025) uses two levels: a per-tensor fp32 scale
``s_t = amax_tensor / (6 * 448)`` maps the tensor into the range of (fp4 max) x (e4m3 max), and each
16-element block gets ``s_b = cast_e4m3(amax_block / 6 / s_t)``; elements are ``cast_e2m1(x / (s_b *
s_t))``. A block whose e4m3 scale underflows to zero holds zeros. No `ScaleRule` applies: one asked
for is refused (`check_rule_for_granularity`).

Integer formats use the ``amax`` rule with ``max = qmax`` (symmetric quantization).
"""

from __future__ import annotations

import math
import numbers
from enum import Enum

import torch

from lowbit.errors import UsageError
from lowbit.formats.cast import binade, cast
from lowbit.formats.spec import Encoding, FloatFormat, Format


class Granularity(str, Enum):
    TENSOR = "tensor"
    AXIS = "axis"
    BLOCK = "block"
    BLOCK2D = "block2d"
    MX = "mx"
    NVFP4 = "nvfp4"


class ScaleRule(str, Enum):
    AMAX = "amax"
    POW2 = "pow2"
    MX_FLOOR = "mx_floor"
    MX_CEIL = "mx_ceil"


MX_BLOCK = 32  # OCP MX v1.0: k = 32 elements share one scale
NVFP4_BLOCK = 16  # NVFP4: 16 elements share one e4m3 scale
E8M0_EXP_MIN, E8M0_EXP_MAX = -127, 127  # exponents e8m0 can encode (0xFF is NaN)
E4M3_MAX = 448.0  # fp8_e4m3 largest finite value: NVFP4's block-scale range
# fp32 bit fields of the power-of-two scale rules (`scale_from_amax`)
_MANTISSA_BITS, _F32_BIAS = 23, 127
_MANTISSA_MASK, _EXPONENT_MASK, _INF_BITS = 0x007FFFFF, 0x7F800000, 0x7F800000
_TWO_POW_M127_BITS = 0x00400000  # 2**-127, the subnormal e8m0's smallest scale stands for
FP4_MAX = 6.0  # fp4_e2m1 largest value
# 2**-149: NVFP4's tensor-scale floor (`nvfp4_scales`)
_F32_SMALLEST_SUBNORMAL = torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps


def block_shape(
    granularity: Granularity, shape_rc: tuple[int, int], block_size=None
) -> tuple[int, int]:
    """The ``(rows, cols)`` block of a granularity on an ``R x C`` matrix."""
    check_block_size(granularity, block_size)
    rows, cols = shape_rc
    if granularity is Granularity.TENSOR:
        return max(rows, 1), max(cols, 1)
    if granularity is Granularity.AXIS:
        return 1, max(cols, 1)
    if granularity is Granularity.MX:
        return 1, int(block_size or MX_BLOCK)
    if granularity is Granularity.NVFP4:
        if isinstance(block_size, tuple | list):
            return int(block_size[0]), int(block_size[1])
        return 1, int(block_size or NVFP4_BLOCK)
    if granularity is Granularity.BLOCK:
        if block_size is None:
            raise UsageError("granularity 'block' needs block_size (e.g. 128 for 1x128 tiles)")
        return 1, int(block_size)
    if block_size is None:
        raise UsageError("granularity 'block2d' needs block_size (e.g. (128, 128))")
    if not isinstance(block_size, tuple | list):
        return int(block_size), int(block_size)
    return int(block_size[0]), int(block_size[1])


_ONE_LENGTH = (Granularity.BLOCK, Granularity.MX)  # 1-D blocks only
_BLOCKED = (*_ONE_LENGTH, Granularity.BLOCK2D, Granularity.NVFP4)  # granularities with a size


def check_block_size(granularity: Granularity, block_size) -> None:
    """Refuse a block size that cannot cut a matrix, naming the fix: a length below 1 (further on
    a division by zero or a kernel's check; for MX and NVFP4 a 0 read as "the default"), a pair
    of lengths where blocks are 1-D (MX, ``block``), or any size for ``tensor`` and ``axis``,
    whose scales cover the whole tensor or whole rows: ``quantize(x, "int8", block_size=32)``
    quantized per tensor without a word (`OperandSpec` refused it; `quantize` did not)."""
    if block_size is None:
        return
    if granularity not in _BLOCKED:
        scales = "for the whole tensor" if granularity is Granularity.TENSOR else "per row"
        raise UsageError(
            f"granularity {granularity.value!r} has no blocks (one scale {scales}), so block_size "
            f"{block_size!r} would be ignored; fix: leave block_size out, or granularity='block' "
            "for 1 x block_size blocks"
        )
    pair = isinstance(block_size, tuple | list)
    sizes = tuple(block_size) if pair else (block_size,)
    whole = all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes)
    if pair and (granularity in _ONE_LENGTH or len(sizes) != 2):
        shape = "one length (e.g. 32)" if granularity in _ONE_LENGTH else "a pair (rows, cols)"
        raise UsageError(
            f"granularity {granularity.value!r} takes {shape} as block_size, got {block_size!r}"
        )
    if not whole or min(sizes) < 1:
        raise UsageError(
            f"block_size must be a positive whole number, got {block_size!r} (lengths are "
            "whole numbers of at least 1); fix: e.g. "
            "block_size=128 for 1x128 blocks, (128, 128) for 2-D tiles"
        )


def default_rule(granularity: Granularity) -> ScaleRule:
    return ScaleRule.MX_FLOOR if granularity is Granularity.MX else ScaleRule.AMAX


def check_rule_for_granularity(rule: ScaleRule, granularity: Granularity) -> None:
    """Refuse a scale rule asked of NVFP4, whose two-level scales (`nvfp4_scales`) follow no
    `ScaleRule`: the rule was dropped without a word (``scale_rule="pow2"`` gave e4m3 block
    scales, not powers of two). Called where a rule is given, so specs without one pay nothing."""
    if granularity is Granularity.NVFP4:
        raise UsageError(
            f"granularity 'nvfp4' sets its own scales (e4m3 block scales of amax / 6 under an "
            f"fp32 tensor scale), so scale rule {rule.value!r} would be ignored; fix: leave "
            "scale_rule out, or granularity 'mx' for power-of-two (e8m0) block scales"
        )


def scale_from_amax(amax: torch.Tensor, fmt: Format, rule: ScaleRule) -> torch.Tensor:
    """The fp32 dequantization scale of blocks with largest magnitude ``amax`` (see module doc).

    A non-finite ``amax`` is its own scale under ``amax`` and ``pow2`` (fp32 scales: inf, or NaN,
    which then spreads to the block's values). Under the MX rules a block holding inf or NaN gets
    the NaN scale: e8m0 has no inf, its only special code is NaN (0xFF), and a NaN scale makes
    every element of its block NaN (OCP MX v1.0 §5.4.1; torchao's ``to_mx`` and microxcaling
    give the same).
    The power-of-two rules are built from fp32 bit fields in a few elementwise ops (on a GPU each
    op is a kernel launch for every quantized operand):

    - ``pow2`` / ``mx_ceil``: the fp32 ratio ``r = amax / max`` rounded up to a power of two is
      ``(bits(r) + 0x7FFFFF) & 0x7F800000``: a non-zero mantissa carries into the exponent field,
      a zero one does not, and the mask drops the mantissa. Ratios up to 2**-127 (fp32
      subnormals, whose exponent field reads as 2**-127) take 2**-127, so the scale is
      ``2**max(ceil(log2 r), -127)``; ``amax = 0`` (or a negative given one) takes 1. No finite
      fp32 ``amax`` over a format ``max`` >= 6 reaches 2**127, e8m0's top.
    - ``mx_floor``: ``2**clamp(floor(log2 amax) - emax_elem, -127, 127)`` with ``floor(log2)`` read
      from the exponent field (-127 for zero and subnormals, so an all-zero block gets 2**-127).
    """
    amax = amax.float()
    fmt_max = fmt.max
    if rule is ScaleRule.AMAX:
        # A tiny block keeps a non-zero scale; inf and NaN pass through the clamp; an all-zero
        # block keeps scale 1 (its values are 0), and so does a negative given amax, as in the
        # fused kernel (clamped to the smallest normal, it would saturate every value).
        scale = (amax / fmt_max).clamp_(min=torch.finfo(torch.float32).tiny)
        return scale.masked_fill_(amax <= 0, 1.0)
    if rule is ScaleRule.MX_FLOOR:
        emax_elem = math.floor(math.log2(fmt_max))
        exponent = (binade(amax) - emax_elem).clamp_(E8M0_EXP_MIN, E8M0_EXP_MAX)
        bits = torch.where(
            exponent > E8M0_EXP_MIN, (exponent + _F32_BIAS) << _MANTISSA_BITS, _TWO_POW_M127_BITS
        )
    else:  # POW2 and MX_CEIL: smallest power of two with amax / s <= max
        ratio_bits = (amax / fmt_max).view(torch.int32).clamp(max=_INF_BITS)  # NaN: no overflow
        tiny = ratio_bits <= _TWO_POW_M127_BITS
        bits = (ratio_bits + _MANTISSA_MASK).bitwise_and_(_EXPONENT_MASK)
        bits.masked_fill_(tiny, _TWO_POW_M127_BITS)
    scale = bits.view(torch.float32)
    if rule is not ScaleRule.MX_FLOOR:
        scale.masked_fill_(amax <= 0, 1.0)  # a negative given amax too, as in the fused kernel
    non_finite = amax if rule is ScaleRule.POW2 else math.nan  # AMAX returned above
    return torch.where(amax < math.inf, scale, non_finite)  # False for inf and NaN


def nvfp4_scales(
    block_amax: torch.Tensor, tensor_amax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's two-level scales: (e4m3-valued block scales, fp32 per-tensor scale).

    A tensor amax of 0 takes tensor scale 1 (Transformer Engine's choice), and so do a NaN one
    and a negative given one. A positive amax below ``6 * 448 * 2**-150`` (about 1.9e-42) would
    round the tensor scale to 0, and the block scales to ``0 / 0`` (NaN) or ``x / 0`` (saturated
    to 448): a NaN or all-zero tensor. The scale is floored at fp32's smallest subnormal instead,
    where such a tensor's block scales stay below 448 and map it onto the fp4 grid. An inf amax
    is its own scale, as under the ``amax`` rule: the tensor reads back as NaN, so that an
    overflow stays visible to the loss scaler (docs/formats.md; Transformer Engine takes 1 and
    saturates).
    """
    tensor_amax = tensor_amax.float()
    tensor_scale = (tensor_amax / (FP4_MAX * E4M3_MAX)).clamp_(min=_F32_SMALLEST_SUBNORMAL)
    tensor_scale = torch.where(tensor_amax > 0, tensor_scale, torch.ones_like(tensor_amax))
    block_scale = cast((block_amax.float() / FP4_MAX) / tensor_scale, "fp8_e4m3")
    return block_scale, tensor_scale


def check_format_for_granularity(fmt: Format, granularity: Granularity) -> None:
    if isinstance(fmt, FloatFormat) and fmt.encoding is Encoding.SCALE:
        # e8m0 has no sign and no zero: every element <= 0 would quantize to NaN
        raise UsageError(
            f"{fmt.name} is a scale format (positive powers of two, no zero, no sign) and cannot "
            "hold tensor elements; fix: quantize to an element format such as fp8_e4m3 "
            "(granularity 'mx' gives it e8m0 block scales), or round scales with cast(x, 'e8m0')"
        )
    if granularity is Granularity.NVFP4 and fmt.name != "fp4_e2m1":
        raise UsageError(f"granularity 'nvfp4' needs format fp4_e2m1, got {fmt.name}")
    if granularity is Granularity.MX and not isinstance(fmt, FloatFormat):
        raise UsageError(f"granularity 'mx' needs a float element format, got {fmt.name}")
