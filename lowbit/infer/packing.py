"""Bit packing of 4-bit codes: two per byte, so an int4/fp4 checkpoint really is half a byte a weight.

Codes run along the last axis (a linear layer's in-features K). Element ``2j`` goes in the low
nibble of byte ``j`` and element ``2j+1`` in the high nibble; an odd K gets one zero code of padding.

- int4 (symmetric, -7..7): the code is the value's 4-bit two's complement (``v & 0xF``).
- fp4 e2m1 (OCP MX v1.0 §5.3.3): sign bit 3, then the index of the magnitude in
  ``[0, 0.5, 1, 1.5, 2, 3, 4, 6]`` (exponent bits 2..1, mantissa bit 0: the same bit layout).
"""

from __future__ import annotations

import torch

# OCP MX v1.0 table of e2m1 magnitudes by code (codes 0..7; bit 3 is the sign).
FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 of shape (..., K) -> uint8 bytes of shape (..., ceil(K/2))."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    low, high = codes[..., 0::2], codes[..., 1::2]
    return (low & 0xF) | ((high & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 codes of shape (..., k)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :k]


def int4_to_codes(values: torch.Tensor) -> torch.Tensor:
    """Integers in -8..7 (any integer dtype) -> 4-bit two's complement codes (uint8)."""
    return (values.to(torch.int16) & 0xF).to(torch.uint8)


def codes_to_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit two's complement codes -> int8 values in -8..7."""
    v = codes.to(torch.int16)
    return torch.where(v >= 8, v - 16, v).to(torch.int8)


def fp4_to_codes(values: torch.Tensor) -> torch.Tensor:
    """Exact e2m1 values (any float dtype) -> 4-bit codes; a value off the grid is a bug."""
    v = values.float()
    table = torch.tensor(FP4_E2M1_MAGNITUDES, device=v.device)
    index = torch.searchsorted(table, v.abs().contiguous())
    if not bool((table[index.clamp(max=7)] == v.abs()).all()):
        raise ValueError("fp4_to_codes: a value is not an fp4 e2m1 number")
    sign = (torch.signbit(v) & (v != 0)).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def codes_to_fp4(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-bit e2m1 codes -> their values."""
    table = torch.tensor(FP4_E2M1_MAGNITUDES, device=codes.device, dtype=torch.float32)
    magnitude = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude).to(dtype)
