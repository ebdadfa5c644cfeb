"""Number formats as data.

Every format is one frozen dataclass; every limit is derived from its bit layout, not typed in, so
a table of formats is also a proof of what each layout means. Float formats follow the IEEE-754
layout (sign, ``ebits`` exponent bits with bias ``bias``, ``mbits`` mantissa bits, subnormals when the
exponent field is zero) and differ only in what the top exponent field encodes:

- ``IEEE``  (fp32, tf32, bf16, fp16, fp8_e5m2): the top exponent field holds inf and NaN, so the
  largest finite value is ``2**(2**ebits - 2 - bias) * (2 - 2**-mbits)``.
- ``FN``    (fp8_e4m3 in the OCP "E4M3FN" variant): no inf; only the all-ones pattern S.1111.111 is
  NaN, so the top binade is usable except its last code: ``max = 2**(2**ebits-1-bias) * (2 - 2**(1-mbits))``
  = 448 for e4m3 (OCP 8-bit FP spec v1.0, table 1).
- ``FINITE`` (fp6_e3m2, fp6_e2m3, fp4_e2m1 of OCP MX v1.0 §5.3.3): no inf, no NaN, every code is a
  number: ``max = 2**(2**ebits-1-bias) * (2 - 2**-mbits)``.

``e8m0`` is the MX block-scale format (OCP MX v1.0 §5.4): eight exponent bits, no sign, no mantissa,
bias 127, the all-ones code is NaN; it represents the powers of two 2**-127 .. 2**127.

Integer formats are symmetric: int8 holds -127..127 (the code -128 is unused so that negation is
exact and the grid is symmetric around zero, as in symmetric int8 quantization everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch

from lowbit.errors import UsageError


class Encoding(str, Enum):
    """What the all-ones exponent field of a float format encodes."""

    IEEE = "ieee"  # inf and NaN
    FN = "fn"  # only the all-ones code is NaN, no inf
    FINITE = "finite"  # no special values at all
    SCALE = "scale"  # unsigned exponent-only scale format (e8m0): all-ones code is NaN


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format described by its bit layout."""

    name: str
    ebits: int
    mbits: int
    bias: int
    encoding: Encoding
    torch_dtype: torch.dtype | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)

    kind = "float"

    @property
    def signed(self) -> bool:
        return self.encoding is not Encoding.SCALE

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite binade."""
        top_field = 2**self.ebits - 1
        if self.encoding is Encoding.IEEE or self.encoding is Encoding.SCALE:
            top_field -= 1
        return top_field - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal binade (``1 - bias``)."""
        if self.encoding is Encoding.SCALE:
            return -self.bias  # e8m0 has no subnormals: code 0 is 2**-127
        return 1 - self.bias

    @property
    def max(self) -> float:
        if self.encoding is Encoding.SCALE:
            return 2.0**self.emax
        if self.encoding is Encoding.FN:
            top_mantissa = 2 - 2.0 ** (1 - self.mbits)  # the all-ones mantissa is NaN
        else:
            top_mantissa = 2 - 2.0**-self.mbits
        return 2.0**self.emax * top_mantissa

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        if self.encoding is Encoding.SCALE:
            return 2.0**self.emin
        return 2.0 ** (self.emin - self.mbits)

    @property
    def has_inf(self) -> bool:
        return self.encoding is Encoding.IEEE

    @property
    def has_nan(self) -> bool:
        return self.encoding is not Encoding.FINITE

    @property
    def epsilon(self) -> float:
        """Relative precision: the gap between 1 and the next larger value (``2**-mbits``)."""
        return 2.0**-self.mbits

    @property
    def dynamic_range_db(self) -> float:
        return 20 * math.log10(self.max / self.min_subnormal)


@dataclass(frozen=True)
class IntFormat:
    """A symmetric two's-complement integer format: values ``-qmax .. qmax``."""

    name: str
    bits: int
    torch_dtype: torch.dtype | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)

    kind = "int"
    signed = True
    has_inf = False
    has_nan = False
    epsilon = 1.0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def min_normal(self) -> float:
        return 1.0

    @property
    def min_subnormal(self) -> float:
        return 1.0


Format = FloatFormat | IntFormat

_FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        FloatFormat("fp32", 8, 23, 127, Encoding.IEEE, torch.float32, "IEEE-754 binary32"),
        FloatFormat("tf32", 8, 10, 127, Encoding.IEEE, None, "NVIDIA TensorFloat-32 (fp32 range)"),
        FloatFormat("bf16", 8, 7, 127, Encoding.IEEE, torch.bfloat16, "bfloat16 (fp32 range)"),
        FloatFormat("fp16", 5, 10, 15, Encoding.IEEE, torch.float16, "IEEE-754 binary16"),
        FloatFormat(
            "fp8_e4m3", 4, 3, 7, Encoding.FN, torch.float8_e4m3fn, "OCP FP8 E4M3FN (no inf)"
        ),
        FloatFormat("fp8_e5m2", 5, 2, 15, Encoding.IEEE, torch.float8_e5m2, "OCP FP8 E5M2"),
        FloatFormat("fp6_e3m2", 3, 2, 3, Encoding.FINITE, None, "OCP MX FP6 E3M2"),
        FloatFormat("fp6_e2m3", 2, 3, 1, Encoding.FINITE, None, "OCP MX FP6 E2M3"),
        FloatFormat("fp4_e2m1", 2, 1, 1, Encoding.FINITE, None, "OCP MX FP4 E2M1"),
        FloatFormat("e8m0", 8, 0, 127, Encoding.SCALE, None, "OCP MX E8M0 power-of-two scale"),
        IntFormat("int8", 8, torch.int8, "symmetric int8 (-127..127)"),
        IntFormat("int4", 4, None, "symmetric int4 (-7..7)"),
    ]
}


def names() -> list[str]:
    """Names of every registered format, in table order."""
    return list(_FORMATS)


def get(name: str | Format) -> Format:
    """The format called ``name`` (a format object is returned as it is)."""
    if isinstance(name, FloatFormat | IntFormat):
        return name
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name (a config file's list)
        raise UsageError(
            f"unknown number format {name!r}; valid formats: {', '.join(_FORMATS)}"
        ) from None
