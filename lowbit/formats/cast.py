"""Rounding a tensor onto a format's grid: round-to-nearest-even and stochastic rounding.

`cast(x, fmt)` returns a tensor of ``x``'s dtype whose every value is exactly representable in
``fmt``. Both roundings share one description of the grid. For a float format with ``mbits``
mantissa bits and smallest normal exponent ``emin``, a value ``x`` with binade ``e = floor(log2|x|)``
lies on a grid of spacing (quantum)

    q(x) = 2 ** (max(e, emin) - mbits)

so subnormals (``e < emin``) share the quantum of the smallest normal binade. Rounding is then
``round(x / q) * q``: both the division and the product are by a power of two and therefore exact,
and the only inexact step is the rounding of ``x / q`` to an integer, which is exactly the rounding of
the format. A carry out of the binade (1.111b -> 10.00b) lands on the next binade's grid, which is
correct. Values are clamped to ``+-max`` first (saturation: OCP FP8/MX "satfinite" behaviour, also for
inf), so rounding can never leave the finite range; NaN passes through as NaN.

Stochastic rounding draws ``u ~ U[0, 1)`` per element and returns ``(floor(x/q) + [u < frac]) * q``
with ``frac = x/q - floor(x/q)``: the upper neighbour with probability equal to the distance to the
lower one in units of q, so ``E[cast(x)] = x`` (unbiased), for every x inside the finite range.
``u`` has 24 random bits, the resolution of the rounding probability; it comes from a
counter-based generator (`lowbit.formats.counter_rng`) that the fused CPU kernel computes too.

Fast paths of round-to-nearest, with results identical to `cast_reference`: bf16, fp16 and fp8
e5m2 use PyTorch's native conversion (round-to-nearest-even with subnormals); fp8 e4m3, fp6 and fp4
use `_nearest_on_grid`, a magic-number rounding on the fp32 adder (PyTorch's fp8 e4m3 -> fp32
conversion is a slow scalar loop on CPU; on a GPU, where it is one kernel, e4m3 takes it too:
`_native_conversion_is_fast`). Tests check them against the generic path and against ml_dtypes
bit for bit (tests/formats/test_cast.py, test_fast_paths.py).
"""

from __future__ import annotations

import functools
import math
from enum import Enum

import torch

from lowbit.errors import UsageError, member
from lowbit.formats.counter_rng import seed_tensor, uniforms
from lowbit.formats.eager_roundings import keep_eager_roundings
from lowbit.formats.spec import Encoding, FloatFormat, Format, IntFormat, get


class Rounding(str, Enum):
    NEAREST = "nearest"  # round to nearest, ties to even
    STOCHASTIC = "stochastic"  # unbiased: up with probability proportional to the distance


_F32_MANTISSA_BITS = 23
_F32_BIAS = 127


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** exponent`` in float32 for integer exponents in [-252, 127].

    Built from the exponent field (no `exp2` rounding). Exponents below -126 (fp32 subnormals, e.g.
    the e8m0 scale 2**-127) are the exact product of two normal powers of two.
    """
    e = exponent.to(torch.int32)
    high = ((e.clamp(min=-126) + _F32_BIAS) << _F32_MANTISSA_BITS).view(torch.float32)
    low = (((e + 126).clamp(min=-126, max=0) + _F32_BIAS) << _F32_MANTISSA_BITS).view(torch.float32)
    return high * low


def _pow2_normal(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` for int32 exponents in [-126, 127] (fp32 normals): the exponent field
    alone, three ops against `pow2`'s nine. Outside that range the bits are not a power of two
    (-127 reads as 0, 128 as inf): only for values whose result is NaN anyway."""
    return ((exponent + _F32_BIAS) << _F32_MANTISSA_BITS).view(torch.float32)


def binade(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(|x|))`` of float32 values from the exponent field (-127 for zero and subnormals)."""
    return ((x.view(torch.int32) >> _F32_MANTISSA_BITS) & 0xFF) - _F32_BIAS


def _round(r: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
    """Round values to integers, ties to even or stochastically; the result keeps the sign of
    ``r`` (a negative value that rounds to zero, and -0.0 itself, give -0.0, as ``torch.round``
    and IEEE-754 rounding do: ``floor(r) + 1`` alone would give +0.0)."""
    if rounding is Rounding.NEAREST:
        return torch.round(r)
    low = torch.floor(r)
    u = uniforms(r.shape, seed_tensor(generator), r.device).to(r.dtype)
    return torch.copysign(low + (u < (r - low)).to(r.dtype), r)


def _cast_float_generic(x32: torch.Tensor, fmt: FloatFormat, rounding, generator) -> torch.Tensor:
    """Reference rounding of float32 values onto the grid of a small float format (see module doc).

    Valid for formats whose quanta are fp32 normals (``emin - mbits >= -126``): every 4/6/8-bit
    format and fp16.
    """
    x32 = x32.clamp(-fmt.max, fmt.max)
    e = binade(x32).clamp(min=fmt.emin)
    quantum = _pow2_normal(e - fmt.mbits)
    inverse_quantum = _pow2_normal(fmt.mbits - e)
    return _round(x32 * inverse_quantum, rounding, generator) * quantum


def _cast_fp32_range(x32: torch.Tensor, fmt: FloatFormat, rounding, generator) -> torch.Tensor:
    """Rounding to a format with fp32's exponent range (bf16, tf32) on the fp32 bit pattern.

    Dropping ``k = 23 - mbits`` low mantissa bits of the fp32 pattern rounds on the format's grid,
    subnormals included, because fp32 and the format share every binade. Nearest adds
    ``2**(k-1) - 1 + lsb`` before truncation (ties to even); stochastic adds a uniform random
    integer in ``[0, 2**k)``.
    """
    k = _F32_MANTISSA_BITS - fmt.mbits
    if k == 0:
        return x32.clamp(-fmt.max, fmt.max)
    bits = x32.clamp(-fmt.max, fmt.max).view(torch.int32)
    if rounding is Rounding.NEAREST:
        bits = bits + ((1 << (k - 1)) - 1) + ((bits >> k) & 1)
    else:
        noise = torch.randint(0, 1 << k, bits.shape, generator=generator, device=bits.device)
        bits = bits + noise.to(torch.int32)
    rounded = (bits & ~((1 << k) - 1)).view(torch.float32)
    # A carry from the largest finite value into the exponent field would be inf: saturate.
    rounded = rounded.clamp(-fmt.max, fmt.max)
    return torch.where(torch.isnan(x32), x32, rounded)


def _cast_e8m0(x32: torch.Tensor, rounding: Rounding, generator) -> torch.Tensor:
    """Nearest power of two in [2**-127, 2**127] (ties up, as ml_dtypes); NaN where x <= 0 or NaN.
    Values above the range saturate to 2**127, +inf too (where ml_dtypes gives NaN, for a value
    of 1.5 * 2**127 or more), as every lowbit cast saturates.

    Stochastic rounding of ``x = 2**e * (1 + f)``, ``f`` in [0, 1), gives ``2**(e + 1)`` with
    probability ``f`` and ``2**e`` otherwise, so ``E[cast(x)] = 2**e * (1 + f) = x`` between
    2**-127 and 2**127 (the neighbours are a power of two apart, the grid spacing is ``2**e``).

    e8m0 has no sign and no zero (OCP MX v1.0 §5.4), so non-positive values have no encoding.
    """
    x64 = x32.double().clamp(max=2.0**127)  # saturation: +inf and overflow give 2**127
    mantissa, exponent = torch.frexp(x64)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    if rounding is Rounding.NEAREST:
        up = mantissa >= 0.75  # m*2 >= 1.5 rounds up
    else:
        u = uniforms(x64.shape, seed_tensor(generator), x64.device)
        up = u < mantissa * 2 - 1  # f = m*2 - 1, exact in float64
    e = exponent - 1 + up.to(exponent.dtype)
    e = e.clamp(-127, 127)
    out = pow2(e)
    return torch.where(x32 > 0, out, torch.full_like(out, float("nan")))


def _cast_int(x: torch.Tensor, fmt: IntFormat, rounding, generator) -> torch.Tensor:
    x = x.clamp(-fmt.qmax, fmt.qmax)
    return _round(x, rounding, generator)


_F32_EXPONENT_MASK = 0x7F800000  # fp32 exponent field: the bits of 2**binade(x) for normal x
_F32_HALF_MANTISSA = 0x00400000  # fp32 mantissa 1.5 (top mantissa bit)


def _nearest_on_grid(y: torch.Tensor, fmt: FloatFormat, owned: bool = False) -> torch.Tensor:
    """RNE of float32 ``y`` onto a small float format's grid; equal bit for bit to the reference.

    Fast path of `_cast_float_generic` (``rounding="nearest"``), in six elementwise passes and
    without a division. With ``owned=True``, ``y`` is a temporary that may be overwritten (clamped in place).

    With ``q`` the quantum of ``y`` (module doc) the magic number ``M = 1.5 * 2**23 * q`` has an fp32
    ulp of exactly ``q``, and ``|y| < 2 * 2**binade(y) <= M / 2**(23 - mbits)`` keeps ``y + M`` in M's
    binade when ``mbits <= 21``; so the fp32 adder rounds ``y + M`` to a multiple of ``q``, ties to
    even (``M / q = 1.5 * 2**23`` is even, so the parity of the sum is that of ``round(y / q)``), and
    ``(y + M) - M`` is exact. ``M``'s bits are built from ``y``'s exponent field, raised to the
    format's smallest normal binade (subnormals share its quantum). ``x + (-x)`` is ``+0`` in IEEE
    arithmetic, so a negative value that rounds to zero gets its sign back with `copysign`, as
    ``torch.round`` keeps it in the reference. NaN stays NaN (NaN + anything is NaN).
    """
    y = y.clamp_(-fmt.max, fmt.max) if owned else y.clamp(-fmt.max, fmt.max)
    magic = y.view(torch.int32) & _F32_EXPONENT_MASK
    lowest = (fmt.emin + _F32_BIAS) << _F32_MANTISSA_BITS
    highest = (fmt.emax + _F32_BIAS) << _F32_MANTISSA_BITS  # only NaN's field is above: no wrap
    magic.clamp_(lowest, highest)
    magic.add_(((_F32_MANTISSA_BITS - fmt.mbits) << _F32_MANTISSA_BITS) + _F32_HALF_MANTISSA)
    magic = magic.view(torch.float32)
    out = torch.add(y, magic)
    out.sub_(magic)
    return out.copysign_(y)


def _has_fast_grid(fmt: Format) -> bool:
    """Formats `_nearest_on_grid` serves: sub-16-bit floats without a fast native CPU conversion."""
    return (
        isinstance(fmt, FloatFormat)
        and fmt.encoding in (Encoding.FN, Encoding.FINITE)
        and fmt.ebits < 8
        and fmt.mbits <= 21
    )


def _native_conversion_is_fast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether rounding through PyTorch's own ``dtype`` conversion beats `_nearest_on_grid`: on a
    GPU every conversion is one elementwise kernel (against the grid's seven), and on the CPU those
    of fp16, bf16 and fp8 e5m2 are fast kernels, while fp8 e4m3's (to it and back to bf16) is a
    slow scalar loop. Both give the same bits (tests/formats/test_fast_paths.py)."""
    if device.type != "cpu":
        return dtype.is_floating_point
    return dtype in (torch.float16, torch.bfloat16, torch.float8_e5m2)


def cast_to_carrier_(
    y: torch.Tensor,
    fmt: Format,
    carrier: torch.dtype,
    rounding: Rounding = Rounding.NEAREST,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``cast(y, fmt, rounding, generator).to(carrier)`` for a float32 temporary ``y`` it may overwrite.

    `quantize`'s hot path: it skips the round trip back to ``y``'s dtype and works in place where
    that is safe. ``carrier`` must hold every value of ``fmt`` exactly (`carrier_dtype`), so the
    final conversion never rounds. Tests compare it with `cast_reference` bit for bit.
    """
    if rounding is Rounding.NEAREST:
        if isinstance(fmt, IntFormat):
            return y.clamp_(-fmt.qmax, fmt.qmax).round_().to(carrier)
        native = fmt.torch_dtype
        if native is not None and _native_conversion_is_fast(native, y.device):
            return y.clamp_(-fmt.max, fmt.max).to(native).to(carrier)  # PyTorch's RNE
        if _has_fast_grid(fmt):
            return _nearest_on_grid(y, fmt, owned=True).to(carrier)
    return cast(y, fmt, rounding, generator).to(carrier)


class NotRealError(UsageError, TypeError):
    """A tensor the formats cannot round (`check_real`): a one-line `UsageError` that is also the
    TypeError `cast` raised for an integer tensor before, so code catching that still does."""


# The dtypes of training operands: `check_real` asks `converts_to_fp32` only of others, so that a
# compiled graph does not trace the probe (Dynamo ignores `functools.cache` there, with a warning).
_CONVERTS_TO_FP32 = frozenset((torch.float32, torch.bfloat16, torch.float16))


@functools.cache
def converts_to_fp32(dtype: torch.dtype) -> bool:
    """Whether PyTorch converts ``dtype`` to fp32, through which every format rounds: not so for
    packed dtypes (``float4_e2m1fn_x2``, two fp4 codes a byte; ``uint4``, ``bits8``...), which
    have no conversion kernel. The probe holds values (an empty tensor converts without reaching
    the kernel): 8 bytes, one or more of any dtype, on the CPU whatever the default device (a
    meta tensor converts without a kernel, and its answer would be cached)."""
    try:
        torch.zeros(8, dtype=torch.uint8, device="cpu").view(dtype).float()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def check_real(x: torch.Tensor, call: str, integers: bool = False) -> None:
    """Refuse, in one line naming the dtype and the fix, a tensor the formats cannot round: a
    complex one (its imaginary part would be dropped silently), a bool one, a PyTorch-quantized
    one (``qint8``: PyTorch's error on a missing operator), and, unless ``integers``
    (`quantize`, whose values come back in a carrier dtype), an integer one: `cast` returns
    ``x``'s dtype, which then holds none of a format's fractions. Something that is no tensor at
    all (a numpy array, a list, a Python float), which ended in an AttributeError, is refused
    too, and so is a packed dtype without a conversion to fp32 (`converts_to_fp32`: a packed
    fp4 weight, ``float4_e2m1fn_x2``, ended in PyTorch's NotImplementedError on "copy_kernel").
    An fp32, bf16 or fp16 tensor pays two checks and a set lookup: `quantize` runs this for
    every GEMM operand."""
    if not isinstance(x, torch.Tensor):
        kind = type(x).__qualname__
        if type(x).__module__ != "builtins":
            kind = f"{type(x).__module__.split('.')[0]}.{kind}"
        raise NotRealError(
            f"{call}() takes a torch.Tensor, got a {kind}; fix: {call}(torch.as_tensor(x), ...)"
        )
    if (
        x.is_floating_point()
        or (integers and not x.is_complex() and x.dtype != torch.bool and not x.is_quantized)
    ) and (x.dtype in _CONVERTS_TO_FP32 or converts_to_fp32(x.dtype)):
        return
    fix = f"{call}(x.float(), ...)"
    if x.is_complex():
        problem, fix = "its imaginary part would be dropped", f"{call}() x.real and x.imag apart"
    elif x.dtype == torch.bool:
        problem = "it holds no numbers"
    elif x.is_quantized:
        problem, fix = "a PyTorch-quantized tensor", f"{call}(x.dequantize(), ...)"
    elif not converts_to_fp32(x.dtype):
        fix = "unpack its codes into a float tensor first"
        if str(x.dtype) == "torch.float4_e2m1fn_x2":  # two e2m1 codes a byte, low nibble first
            # (by name: an older PyTorch has no such attribute)
            fix += (
                ": from lowbit.infer.packing import codes_to_fp4, unpack_nibbles; "
                "x = codes_to_fp4(unpack_nibbles(x.view(torch.uint8), 2 * x.shape[-1]))"
            )
        raise NotRealError(
            f"{call}() cannot read {x.dtype}, a packed dtype that PyTorch cannot convert to fp32, "
            f"through which every format rounds; fix: {fix}"
        )
    else:
        problem = "the result would keep that dtype, which holds no fractions"
    kind = "real" if integers else "floating-point"
    raise NotRealError(f"{call}() takes a {kind} tensor, got {x.dtype} ({problem}); fix: {fix}")


def check_generator(generator) -> None:
    """Refuse a ``generator`` that is neither None (the default generator) nor a
    `torch.Generator` (a seed given as an int, say), in one line naming the fix: it ended in an
    AttributeError deep in the draws, or in torch's page-long list of ``randint`` signatures for
    bf16 and tf32."""
    if generator is not None and not isinstance(generator, torch.Generator):
        seed = generator if isinstance(generator, int) and not isinstance(generator, bool) else 0
        raise UsageError(
            f"generator must be a torch.Generator, got {type(generator).__name__} "
            f"{generator!r}; fix: generator=torch.Generator().manual_seed({seed})"
        )


def cast_reference(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: Rounding | str = Rounding.NEAREST,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`cast` without native dtype shortcuts: the bit-layout algorithm for every format."""
    check_real(x, "cast_reference")
    keep_eager_roundings()
    check_generator(generator)
    fmt = get(fmt)
    rounding = member(Rounding, rounding, "rounding")
    if isinstance(fmt, IntFormat):
        return _cast_int(x.float(), fmt, rounding, generator).to(x.dtype)
    x32 = x.float()
    if fmt.encoding is Encoding.SCALE:
        return _cast_e8m0(x32, rounding, generator).to(x.dtype)
    if fmt.ebits == 8:
        return _cast_fp32_range(x32, fmt, rounding, generator).to(x.dtype)
    return _cast_float_generic(x32, fmt, rounding, generator).to(x.dtype)


def cast(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: Rounding | str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` onto ``fmt``'s grid, saturating at ``+-fmt.max``; returns ``x``'s dtype.

    ``rounding="nearest"`` rounds to nearest, ties to even, with subnormals; ``"stochastic"`` rounds
    up or down with probability proportional to the distance (unbiased), drawing from
    ``generator`` (reproducible for a seeded generator). NaN stays NaN; +-inf saturate to +-max.
    Integer formats round to integers in ``[-qmax, qmax]`` (apply a scale first: see `quantize`).

    The result can hold ``fmt``'s values only if ``x``'s dtype can: every 4/6/8-bit format fits in
    fp32, bf16 and fp16, but fp16 values do not fit in bf16 (nor bf16's range in fp16); for such a
    pair the fp32 result is rounded again to ``x``'s dtype. Cast ``x.float()`` to avoid that.
    A float64 ``x`` is rounded to fp32 first, as PyTorch's own casts to fp8 do: a value within half
    an fp32 ulp of a tie of ``fmt`` can then round the other way than rounding it directly would.
    Under `torch.compile` it gives eager's bits (`lowbit.formats.eager_roundings`).
    """
    check_real(x, "cast")
    keep_eager_roundings()
    check_generator(generator)
    fmt = get(fmt)
    rounding = member(Rounding, rounding, "rounding")
    if x.element_size() == 1:
        # PyTorch's fp8 dtypes have no arithmetic on the CPU (no clamp): round their exact fp32
        # values, which is what every path below does with an fp8 input anyway
        return cast(x.float(), fmt, rounding, generator).to(x.dtype)
    dtype = x.dtype
    native = fmt.torch_dtype
    if rounding is Rounding.NEAREST and _has_fast_grid(fmt):
        # fp8 e4m3, fp6, fp4: magic-number rounding (e4m3's native fp8 -> fp32 is slow on CPU)
        return _nearest_on_grid(x.float(), fmt, owned=x.dtype != torch.float32).to(x.dtype)
    if rounding is Rounding.NEAREST and native is not None and native.is_floating_point:
        if native == x.dtype and fmt.name != "fp32":
            return x.clamp(-fmt.max, fmt.max)
        if not _holds_exactly(x.dtype, fmt.max):
            # fp16 <-> bf16, or fp32 of a 16-bit x: clamping in x's dtype would round (or
            # overflow) the bound itself, so clamp and convert from fp32, as `cast_reference` does
            x = x.float()
        return x.clamp(-fmt.max, fmt.max).to(native).to(dtype)
    return cast_reference(x, fmt, rounding, generator)


def _holds_exactly(dtype: torch.dtype, value: float) -> bool:
    """Whether ``dtype`` represents the normal number ``value`` exactly (65504 is not a bf16
    number, 2**127 no fp16): within its range, and no more significant bits than it holds
    (``1 - log2(eps)``). Plain arithmetic on Python floats, which Dynamo folds into constants when
    it traces `cast` (a `functools.cache` made it warn that it ignores the cache)."""
    if dtype == torch.float64:
        return True
    info = torch.finfo(dtype)
    significand = math.ldexp(math.frexp(value)[0], 1 - round(math.log2(info.eps)))
    return abs(value) <= info.max and significand == math.floor(significand)
