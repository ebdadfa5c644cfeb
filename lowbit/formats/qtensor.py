"""`quantize`: a tensor to low-precision values plus block scales, and back.

See `lowbit.formats.scaling` for the block layouts and scale rules. The values are kept in a
*carrier* dtype that holds every value of the format exactly: bfloat16 for 4-, 6- and 8-bit floats
(their exponents and mantissas fit inside bf16's), int8 for integer formats, and the format's own
dtype for bf16/fp16/fp32. Emulated GEMMs consume the carrier directly.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from lowbit import kernels
from lowbit.errors import UsageError, member
from lowbit.formats.cast import Rounding, cast_to_carrier_, check_generator, check_real
from lowbit.formats.counter_rng import seed_tensor
from lowbit.formats.eager_roundings import keep_eager_roundings
from lowbit.formats.hadamard import check_signs, padded_length, transform
from lowbit.formats.scaling import (
    Granularity,
    ScaleRule,
    block_shape,
    check_format_for_granularity,
    check_rule_for_granularity,
    default_rule,
    nvfp4_scales,
    scale_from_amax,
)
from lowbit.formats.spec import Encoding, FloatFormat, Format, IntFormat, get


def carrier_dtype(fmt: Format) -> torch.dtype:
    """The smallest torch dtype that holds every value of ``fmt`` exactly."""
    if isinstance(fmt, IntFormat):
        return torch.int8
    if fmt.torch_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return fmt.torch_dtype
    if fmt.name == "tf32":
        return torch.float32
    return torch.bfloat16


def to_matrix(x: torch.Tensor, axis: int) -> torch.Tensor:
    """View ``x`` as ``R x C`` with ``axis`` last and every other dimension flattened into rows."""
    if x.dim() == 2 and axis % 2 == 1:  # already a matrix with the axis last (GEMM operands)
        return x
    if x.dim() == 0:
        return x.reshape(1, 1)
    moved = x.movedim(axis, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])  # no -1: 0-size inputs


def from_matrix(m: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    """Inverse of `to_matrix` for a tensor of the given original shape."""
    if len(shape) == 2 and axis % 2 == 1 and m.shape == shape:
        return m
    if len(shape) == 0:
        return m.reshape(shape)
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(axis))
    return m.reshape(moved_shape).movedim(-1, axis)


def _pad_to_blocks(m: torch.Tensor, block: tuple[int, int], pad: bool) -> torch.Tensor:
    rows, cols = m.shape
    pad_rows, pad_cols = (-rows) % block[0], (-cols) % block[1]
    if pad_rows or pad_cols:
        if not pad:
            raise UsageError(
                f"shape {rows}x{cols} (axis last) does not divide into {block[0]}x{block[1]} "
                "blocks; pass pad=True to zero-pad the last block, or choose a block size "
                "that divides it"
            )
        m = torch.nn.functional.pad(m, (0, pad_cols, 0, pad_rows))
    return m


def _blocked(m: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``(R, C)`` -> ``(R/br, br, C/bc, bc)`` (R and C already multiples of the block)."""
    rows, cols = m.shape
    return m.reshape(rows // block[0], block[0], cols // block[1], block[1])


def _abs_max_in_one_op(device: torch.device) -> bool:
    """Whether max |x| is taken by one norm reduction (``vector_norm(x, inf)``) rather than by
    ``aminmax`` and three small ops: on a GPU, where each op is a kernel launch; on the CPU the
    norm kernel is ~10x slower than ``aminmax`` (scratch timing, 4096 x 1024 fp32: 6.3 vs 0.6 ms).
    Both give max |x| exactly, NaN propagating, +0.0 for all-zero blocks."""
    return device.type != "cpu"


def _block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks.abs().amax(dim=(1, 3), keepdim=True)`` with fewer passes over the data.

    ``max(-min, max)`` from one `aminmax` pass reads the data once and allocates no ``|x|`` copy;
    NaN propagates as in ``amax``. The final ``abs`` (on the small result) turns the ``-0.0`` of an
    all-zero block into ``+0.0``, as ``amax`` of ``|x|`` gives. Off the CPU: one norm reduction.
    """
    n0, b0, n1, _ = blocks.shape
    if _abs_max_in_one_op(blocks.device):
        return torch.linalg.vector_norm(blocks, math.inf, dim=(1, 3), keepdim=True)
    if n0 == 1 and n1 == 1:  # one block: the whole (contiguous or strided) tensor
        low, high = torch.aminmax(blocks)
    elif b0 == 1:  # 1 x b blocks: amax and amin along the last axis (aminmax(dim=) is slower)
        low, high = blocks.amin(dim=3, keepdim=True), blocks.amax(dim=3, keepdim=True)
    else:  # 2-D tiles: aminmax reduces one dim only
        return blocks.abs().amax(dim=(1, 3), keepdim=True)
    return torch.maximum(high, low.neg_()).abs_().reshape(n0, 1, n1, 1)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """``x.abs().amax()`` as an fp32 scalar in one pass over ``x`` and without an ``|x|`` copy
    (``max(-min, max)`` from `torch.aminmax`; NaN propagates; ``abs`` turns -0.0 into +0.0; off the
    CPU one norm reduction, `_abs_max_in_one_op`). An empty tensor's amax is 0."""
    check_real(x, "tensor_amax", integers=True)
    x = x.detach()
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    if _abs_max_in_one_op(x.device):
        return torch.linalg.vector_norm(x, math.inf).float()
    low, high = torch.aminmax(x)
    return torch.maximum(high, low.neg()).abs().float()


# Dtypes whose values fp32 holds exactly: quantized without an fp32 copy (see `quantize`).
_PROMOTE_EXACTLY = (torch.float32, torch.bfloat16, torch.float16)


def _reciprocal_is_exact(rule: ScaleRule, granularity: Granularity) -> bool:
    """Whether ``x * (1 / scale)`` equals ``x / scale`` bit for bit for this rule's scales.

    For a power-of-two ``s`` whose reciprocal is an fp32 number, both are the correctly rounded
    value of the same real ``x / s``, so they agree for every x (also for inf and NaN scales:
    ``1/inf = 0``, ``1/NaN = NaN``). The MX and ``pow2`` rules give ``2**e`` with ``e`` in
    [-127, 127] (`scale_from_amax`; 1 for an all-zero block), whose reciprocals are all fp32
    numbers (2**-127's is 2**127). ``amax`` scales and NVFP4's ``e4m3 x fp32`` products are not
    powers of two: ``x / s`` and ``x * (1/s)`` differ, so they divide.
    """
    return granularity is not Granularity.NVFP4 and rule in (
        ScaleRule.POW2,
        ScaleRule.MX_FLOOR,
        ScaleRule.MX_CEIL,
    )


_KERNEL_RULES = {
    ScaleRule.AMAX: 0,
    ScaleRule.POW2: 1,
    ScaleRule.MX_FLOOR: 2,
    ScaleRule.MX_CEIL: 3,
}
_KERNEL_NVFP4_RULE = 4
_KERNEL_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _fusable(x, fmt) -> bool:
    """Whether `lowbit.kernels` computes this quantization (the same values, in one pass)."""
    small_float = (  # fp8/fp6/fp4: bf16 carrier, magic-number rounding (cast.py)
        isinstance(fmt, FloatFormat)
        and fmt.encoding is not Encoding.SCALE
        and fmt.ebits < 8
        and carrier_dtype(fmt) == torch.bfloat16
    )
    return (
        (small_float or isinstance(fmt, IntFormat))
        and x.dtype in _KERNEL_INPUTS
        and x.numel() > 0
        and kernels.usable(x)
    )


def _hadamard_in_kernel(granularity, block_size, amax, signs) -> bool:
    """Whether the fused kernel (when it serves the tensor) applies the Hadamard transform while
    quantizing: 1-D blocks that tile its blocks, with measured amaxes (a given amax is one of the
    transformed tensor)."""
    if amax is not None:
        return False
    if granularity not in (Granularity.MX, Granularity.NVFP4, Granularity.BLOCK):
        return False
    rows, cols = block_shape(granularity, (1, 1), block_size)
    return rows == 1 and signs.numel() % cols == 0


def _quantize_fused(
    x,
    fmt,
    granularity,
    axis,
    block_size,
    rule,
    amax,
    pad,
    rounding,
    generator,
    fold,
    hadamard,
    keep_values,
    measure_amax,
) -> QTensor:
    """`quantize` through the fused CPU kernel (every granularity).

    Stochastic rounding draws one seed from ``generator`` and the kernel computes the counter-based
    uniforms (`lowbit.formats.counter_rng`) of the shape the PyTorch path draws (rows and cols
    padded to whole blocks), so both give the same bits. ``hadamard``: signs the kernel transforms
    with (see `quantize`); the result has the padded shape.
    """
    matrix = to_matrix(x, axis)  # a strided view (a transposed operand) is gathered by the kernel
    rows, cols = matrix.shape
    shape = x.shape
    if hadamard is not None:
        cols = padded_length(cols, hadamard.numel())
        shape = _with_length(x.shape, axis, cols)
    block = block_shape(granularity, (rows, cols), block_size)
    tiles = granularity is not Granularity.TENSOR and block[0] > 1  # 2-D blocks
    # 2-D tiles read whole rows of each tile. A traced graph (`torch.compile`) asks for the copy
    # without reading the stride (a no-op on a contiguous matrix): reading it in an autograd
    # function's backward makes Dynamo trace the backward again and leave autocast off for the
    # rest of the model (torch 2.13; see `lowbit.nn.gemm._epilogue_takes`).
    if tiles and cols > 1 and (torch.compiler.is_compiling() or matrix.stride(1) != 1):
        matrix = matrix.contiguous()
    # `pad` first: a traced graph with a symbolic token count guarded on its remainder here.
    if not pad and (cols % block[1] or rows % block[0]):
        _pad_to_blocks(matrix, block, pad)  # raises the usual error
    if amax is not None and granularity is Granularity.AXIS:
        amax = _external_block_amax(amax, rows, granularity).reshape(rows)
    noise_seed = seed_tensor(generator) if rounding is Rounding.STOCHASTIC else None
    nvfp4 = granularity is Granularity.NVFP4
    fold = (
        fold
        and not isinstance(fmt, IntFormat)
        and (block[1] < cols or granularity is Granularity.AXIS)  # not one scale for everything
        and _scales_fold_exactly(granularity, None if nvfp4 else rule)
    )

    def run(write_values: bool):
        return kernels.quantize_rows(
            matrix,
            _kernel_block(granularity, block),
            block_rows=block[0] if tiles else 1,
            integer=isinstance(fmt, IntFormat),
            mbits=getattr(fmt, "mbits", 0),
            emin=getattr(fmt, "emin", 0),
            emax=getattr(fmt, "emax", 0),
            fmt_max=float(fmt.max),
            rule=_KERNEL_NVFP4_RULE if granularity is Granularity.NVFP4 else _KERNEL_RULES[rule],
            amax=amax,
            noise_seed=noise_seed,
            fold=fold,
            hadamard=hadamard,
            write_values=write_values,
            measure_amax=measure_amax,
        )

    # A traced graph (torch.compile, torch.export) cannot branch on the scales' values
    # (`_fold_loses_values`): it writes the values from the start, the same bits.
    write_values = keep_values or not fold or torch.compiler.is_compiling()
    values, scale, tensor_scale, folded, measured = run(write_values)
    if not write_values and _fold_loses_values(scale, fmt, granularity):
        # Rare (tiny data, or an inf in a block): `QTensor.values` could not be recovered from
        # the folded operand, so the values are written after all (the same noise seed: the
        # same rounding). The folded operand stays the GEMM's, as the PyTorch path folds it.
        write_values = True
        values, scale, tensor_scale, folded, measured = run(True)
    return QTensor(
        values=from_matrix(values, shape, axis) if write_values else None,
        scale=scale,
        fmt=fmt,
        granularity=granularity,
        block=block,
        axis=axis,
        tensor_scale=tensor_scale.reshape(()) if nvfp4 else None,
        scale_rule=None if nvfp4 else rule,
        folded=from_matrix(folded, shape, axis) if fold else None,
        measured_amax=measured.reshape(()) if measure_amax else None,
    )


def _kernel_block(granularity: Granularity, block: tuple[int, int]) -> int:
    """`kernels.quantize_rows`' block: 0 for one scale, `kernels.ROW_BLOCK` for one per row (not
    the row's length, which a traced graph may hold as a symbolic size; see there)."""
    if granularity is Granularity.TENSOR:
        return 0
    return kernels.ROW_BLOCK if granularity is Granularity.AXIS else block[1]


class AxisQuantizer:
    """``quantize(x, fmt, "axis", scale_rule=rule)`` of 2-D tensors (one scale per row, along the
    last axis) for an integer format, with the checks and the dispatch done once.

    A converted layer quantizes operands of one spec every step; through `quantize` each call
    pays ~10 us of argument checks and dispatch around a ~6 us kernel call (16 x 16 operands,
    scratch timing), which at the default workload's 28 layers is a visible part of int8's step.
    `usable` says whether the fused kernel takes ``x``; then ``quantizer(x)`` returns the
    `QTensor` that `quantize` returns, bit for bit (tests/formats)."""

    def __init__(self, fmt: str | Format, scale_rule: ScaleRule | str | None = None):
        self.fmt = get(fmt)
        if not isinstance(self.fmt, IntFormat):
            raise UsageError(f"AxisQuantizer takes integer formats, got {self.fmt.name}")
        check_format_for_granularity(self.fmt, Granularity.AXIS)
        self.rule = (
            member(ScaleRule, scale_rule, "scale rule")
            if scale_rule is not None
            else default_rule(Granularity.AXIS)
        )
        self.fmt_max = float(
            self.fmt.max
        )  # the kernel's arguments (`lowbit.kernels.quantize_rows`)
        self.rule_code = _KERNEL_RULES[self.rule]

    def usable(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and _fusable(x, self.fmt)

    def __call__(self, x: torch.Tensor) -> QTensor:
        cols = x.shape[1]
        values, scale, *_ = kernels.quantize_rows(
            x.detach(),
            kernels.ROW_BLOCK,
            integer=True,
            mbits=0,
            emin=0,
            emax=0,
            fmt_max=self.fmt_max,
            rule=self.rule_code,
            amax=None,
        )
        return QTensor(
            values=values,
            scale=scale,
            fmt=self.fmt,
            granularity=Granularity.AXIS,
            block=(1, max(cols, 1)),
            axis=1,
            scale_rule=self.rule,
        )


_BF16_MIN_SUBNORMAL_EXPONENT = -133  # bf16's smallest subnormal, 2**-133 (fp32's range, 7 bits)


def _fold_loses_values(scale: torch.Tensor, fmt: Format, granularity: Granularity) -> bool:
    """Whether the folded operand (values times block scales, in bf16) may not give the values
    back: a block scale of inf (an inf amax: its zeros fold to NaN), a power-of-two scale so
    small that a value times it is not a bf16 number, or one so large that the format's largest
    value times it overflows to inf. The product of a value (a multiple of the format's smallest
    subnormal ``2**(emin - mbits)``) and a power-of-two scale ``s`` is exact in bf16 when
    ``s * 2**(emin - mbits) >= 2**-133``; MX and pow2 scales go down to 2**-127 (data of
    magnitude ~1e-35). At the top, ``pow2`` and ``mx_ceil`` scales of an amax near fp32's max
    round it up onto ``2**128`` (3.4e38 in e4m3: 256 * 2**120), which reads back as inf, no value
    of the format (``mx_floor``'s ``max * s`` stays below ``2**128``). NVFP4's e4m3 block scales
    (>= 2**-9, or 0) times e2m1 values always fit. One `aminmax` pass over the scales; a NaN
    scale answers True (the values are then written)."""
    if granularity is Granularity.NVFP4 or not isinstance(fmt, FloatFormat) or scale.numel() == 0:
        return False
    smallest = 2.0 ** (_BF16_MIN_SUBNORMAL_EXPONENT - fmt.emin + fmt.mbits)
    low, high = torch.aminmax(scale)
    # exact for power-of-two scales: inf exactly where some value times the scale may overflow
    return not bool((low >= smallest) & (high * fmt.max < math.inf))


def _with_length(shape: torch.Size, axis: int, length: int) -> torch.Size:
    sizes = list(shape)
    sizes[axis] = length
    return torch.Size(sizes)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """`lowbit.formats.hadamard.transform` along ``axis`` (fp32, that axis zero-padded)."""
    if axis % max(x.dim(), 1) == x.dim() - 1:
        return transform(x, signs)
    return transform(x.movedim(axis, -1), signs).movedim(-1, axis)


def _scales_fold_exactly(granularity: Granularity, rule: ScaleRule | None) -> bool:
    return granularity is Granularity.NVFP4 or rule in (
        ScaleRule.MX_FLOOR,
        ScaleRule.MX_CEIL,
        ScaleRule.POW2,
    )


_EXTERNAL_AMAX = (Granularity.TENSOR, Granularity.AXIS, Granularity.NVFP4)


def _external_block_amax(amax: torch.Tensor, rows: int, granularity: Granularity) -> torch.Tensor:
    """A given amax in the ``(R/br, 1, C/bc, 1)`` layout of `_block_amax` (tensor or per row)."""
    amax = amax.float()
    if granularity is Granularity.TENSOR:
        return amax.reshape(1, 1, 1, 1)
    if amax.numel() != rows:
        raise UsageError(f"a per-row amax needs {rows} values (one per row), got {amax.numel()}")
    return amax.reshape(rows, 1, 1, 1)


def _checked_axis(axis: int, dim: int) -> int:
    """``axis`` as an index in ``[0, dim)``, refused outside ``[-dim, dim)`` as PyTorch refuses a
    dim (a 0-d tensor takes 0 and -1): taken modulo ``dim`` it would quietly be another axis.
    An axis that is no whole number is refused as well (``"last"`` ended in a TypeError, ``1.0``
    passed as a float index)."""
    try:
        axis = operator.index(axis)  # ints, numpy's, 0-d integer tensors
    except TypeError:
        raise UsageError(
            f"axis must be a whole number (a dimension of x), got {axis!r}; fix: e.g. axis=-1 "
            "for the last dimension"
        ) from None
    size = max(dim, 1)
    if not -size <= axis < size:
        raise UsageError(
            f"axis {axis} is out of range for a {dim}-D tensor; fix: an axis in [{-size}, {size - 1}]"
        )
    return axis % size


def _checked_amax(amax, granularity: Granularity, device: torch.device) -> torch.Tensor:
    """An external amax as a tensor (a Python number is "a scalar" too), refused when granularity
    'tensor' or 'nvfp4' is given more than one value (the count per row is checked with the rows,
    `_external_block_amax`)."""
    if not isinstance(amax, torch.Tensor):
        try:
            amax = torch.tensor(float(amax), device=device)
        except (TypeError, ValueError):
            raise UsageError(
                f"amax must be a number or a tensor, got {amax!r}; fix: e.g. amax=x.abs().amax()"
            ) from None
    if granularity is not Granularity.AXIS:
        if amax.numel() != 1:
            raise UsageError(
                f"granularity {granularity.value!r} takes one amax (the tensor's), got "
                f"{amax.numel()} values; fix: pass x.abs().amax() or a history's maximum"
            )
        amax = amax.reshape(())  # a 0-d tensor scale whatever the amax's shape, as the kernel's
    return amax


# The CPU's made at import: asked for first inside a `torch.compile` trace (a model compiled before
# its first eager step), its creation below broke the graph at the context manager.
_UNIT_SCALES: dict[torch.device, torch.Tensor] = {
    torch.device("cpu"): torch.ones(1, 1, dtype=torch.float32, device="cpu")
}


def unit_scale(device: torch.device | str) -> torch.Tensor:
    """The 1 x 1 fp32 scale 1.0 of an unscaled tensor on ``device``: one shared tensor per device,
    never written, so that a GEMM can tell by identity that it has no scale to apply."""
    device = torch.device(device)
    if device not in _UNIT_SCALES:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        # a real tensor even when first asked for inside a trace (torch.export's fake tensors):
        # a fake one kept here broke every later eager call of the process; and a normal one when
        # first asked for under `torch.inference_mode()` (a GPU model evaluated before it
        # trains): an inference tensor kept here failed every later backward that saved it
        with unset_fake_temporarily(), torch.inference_mode(False):
            _UNIT_SCALES[device] = torch.ones(1, 1, device=device)
    return _UNIT_SCALES[device]


@dataclass
class QTensor:
    """Low-precision values with their block scales.

    ``values`` has the original shape and the carrier dtype; ``scale`` is the fp32 grid of block
    scales, shape ``(ceil(R/br), ceil(C/bc))`` on the axis-last matrix view; ``tensor_scale`` is the
    fp32 second-level scale of NVFP4 (None otherwise); ``folded`` the values times their block
    scales in bf16 where that is exact (what an emulated GEMM reads), from the fused kernel.
    ``measured_amax`` is max |x| of the quantized tensor (fp32, 0-d) when `quantize` was asked
    for it (``measure_amax=True``; a delayed-scaling history records it), else None.

    ``values`` may be constructed as None when ``folded`` is given (``quantize(...,
    keep_values=False)``): the kernel then skips writing them, and they are recovered from
    ``folded`` on first access (`_unfolded`).
    """

    values: torch.Tensor
    scale: torch.Tensor
    fmt: Format
    granularity: Granularity
    block: tuple[int, int]
    axis: int
    tensor_scale: torch.Tensor | None = None
    scale_rule: ScaleRule | None = None
    folded: torch.Tensor | None = None
    measured_amax: torch.Tensor | None = None

    @property
    def scales_fold_exactly(self) -> bool:
        """Whether block scales times values stay exact in bf16: power-of-two scales (MX, pow2)
        move only the exponent, and an e2m1 value (2 significant bits) times an NVFP4 e4m3 scale
        (4 bits) has at most 6, within bf16's 8 (inside bf16's exponent range)."""
        return _scales_fold_exactly(self.granularity, self.scale_rule)

    @property
    def shape(self) -> torch.Size:
        stored = self.__dict__["values"]  # without recovering values the kernel did not write
        return (self.folded if stored is None else stored).shape

    def _unfolded(self) -> torch.Tensor:
        """``folded`` divided by the block scales: the values exactly, since the fold was exact
        (`scales_fold_exactly`; dividing an exact product by a power of two or by an e4m3 scale
        gives back the factor). An NVFP4 block whose scale is not positive (underflowed, or NaN)
        holds zeros, as the quantizer writes them; a block with an infinite scale (an inf amax)
        would give NaN where its values are zeros, and values times a scale below bf16's range
        lose bits: `quantize` keeps the values it wrote in those cases (`_fold_loses_values`)."""
        folded = to_matrix(self.folded, self.axis).float()
        rows, cols = folded.shape
        grid = self.scale.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        grid = grid[:rows, :cols]
        values = folded / grid
        if self.granularity is Granularity.NVFP4:
            values = torch.where(grid > 0, values, 0.0)
        return from_matrix(values.to(self.folded.dtype), self.folded.shape, self.axis)

    def effective_scale(self) -> torch.Tensor:
        """The block scales times the per-tensor scale (fp32, block-grid shape)."""
        if self.tensor_scale is None:
            return self.scale
        return self.scale * self.tensor_scale

    def expanded_scale(self) -> torch.Tensor:
        """The scale of every element, shaped like ``values`` (fp32)."""
        rows, cols = to_matrix(self.values, self.axis).shape
        grid = self.effective_scale()
        full = grid.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return from_matrix(full[:rows, :cols].contiguous(), self.values.shape, self.axis)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``values * scale``, computed in fp32 and returned as ``dtype``."""
        keep_eager_roundings()  # the rounding to a 16-bit dtype, read fused under inductor
        return (self.values.float() * self.expanded_scale()).to(dtype)

    @property
    def nbytes_packed(self) -> int:
        """Storage a packed encoding needs: ``bits`` per element plus the scales' own bits: 8 for
        NVFP4's e4m3 scales and for MX's powers of two (e8m0), 32 for fp32 scales, MX blocks
        under the ``amax`` rule included (any fp32 value; counted as e8m0 they read 8 bits)."""
        e8m0 = self.granularity is Granularity.MX and self.scale_rule is not ScaleRule.AMAX
        scale_bits = 8 if e8m0 or self.granularity is Granularity.NVFP4 else 32
        element_bits = self.values.numel() * self.fmt.bits
        return (element_bits + self.scale.numel() * scale_bits + 7) // 8 + (
            4 if self.tensor_scale is not None else 0
        )


def _get_values(q: QTensor) -> torch.Tensor:
    stored = q.__dict__["values"]
    if stored is None:
        if q.folded is None:
            raise ValueError("a QTensor needs values or folded values")
        stored = q.__dict__["values"] = q._unfolded()
    return stored


def _set_values(q: QTensor, values: torch.Tensor | None) -> None:
    q.__dict__["values"] = values


# ``values`` is a dataclass field (constructor argument) served through a property, so that values
# the kernel did not write are recovered from ``folded`` only when someone reads them.
QTensor.values = property(_get_values, _set_values, doc="The elements in the carrier dtype.")


@torch.no_grad()
def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    granularity: Granularity | str = Granularity.TENSOR,
    *,
    axis: int = -1,
    block_size: int | tuple[int, int] | None = None,
    scale_rule: ScaleRule | str | None = None,
    rounding: Rounding | str = Rounding.NEAREST,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | None = None,
    pad: bool = True,
    fold: bool = False,
    hadamard: torch.Tensor | None = None,
    keep_values: bool = True,
    measure_amax: bool = False,
) -> QTensor:
    """Quantize ``x`` to ``fmt`` with one scale per block of the given granularity.

    ``axis`` is the axis the blocks run along (for a GEMM operand, its contraction axis).
    ``block_size`` is an int for 1-D blocks or a pair for 2-D blocks (``(16, 16)`` for NVFP4
    weights). ``amax`` overrides the measured amax (delayed scaling, or the max over the ranks of a
    data-parallel job): a scalar for granularity ``tensor``, one value per row of the axis-last
    matrix (shape ``(rows,)`` or ``(rows, 1)``) for ``axis``, and the per-tensor amax (a scalar) of
    ``nvfp4``, whose block amaxes are still measured. ``scale_rule="pow2"`` forces power-of-two scales; for MX, ``"mx_ceil"`` is the round-up
    variant of the OCP rule. Blocks that do not divide the shape are zero-padded (``pad=True``) or
    refused. ``fold=True`` asks the fused CPU kernel for `QTensor.folded` as well (the operand of an
    emulated GEMM; elsewhere it stays None and the GEMM folds the scales itself);
    ``keep_values=False`` then lets the kernel write the folded operand only (values are recovered
    from it if read, `QTensor`): one output stream less for a GEMM operand.
    ``hadamard`` (random signs, see `lowbit.formats.hadamard`) quantizes the random Hadamard
    transform of ``x`` along ``axis`` instead, that axis zero-padded to whole transform blocks (the
    result has the padded shape); the fused CPU kernel transforms each block as it quantizes it.
    ``measure_amax=True`` (granularity ``tensor``) also returns max |x| of the quantized tensor in
    `QTensor.measured_amax`: with a given (delayed) ``amax`` the fused CPU kernel takes it in its
    rounding pass, so delayed scaling needs no separate pass over ``x`` for its history.
    """
    check_real(x, "quantize", integers=True)
    keep_eager_roundings()
    check_generator(generator)
    fmt = get(fmt)
    granularity = member(Granularity, granularity, "granularity")
    check_format_for_granularity(fmt, granularity)
    if scale_rule is not None:
        rule = member(ScaleRule, scale_rule, "scale rule")
        check_rule_for_granularity(rule, granularity)
    else:
        rule = default_rule(granularity)
    if amax is not None and granularity not in _EXTERNAL_AMAX:
        raise UsageError(
            f"an external amax needs granularity 'tensor', 'axis' or 'nvfp4', got {granularity.value}"
        )
    if measure_amax and granularity is not Granularity.TENSOR:
        raise UsageError(
            f"measure_amax needs granularity 'tensor' (one amax), got {granularity.value}"
        )
    axis = _checked_axis(axis, x.dim())
    if amax is not None:
        amax = _checked_amax(amax, granularity, x.device)
    rounding = member(Rounding, rounding, "rounding")
    fusable = _fusable(x, fmt)
    if hadamard is not None:
        check_signs(hadamard)
        if x.dim() == 0:
            raise UsageError(
                "hadamard transforms along an axis, and a 0-d tensor has none; fix: "
                "quantize x.reshape(1), or leave hadamard out"
            )
        if not (fusable and _hadamard_in_kernel(granularity, block_size, amax, hadamard)):
            x, hadamard = hadamard_transform(x, hadamard, axis), None
            fusable = _fusable(x, fmt)
    if fusable:
        return _quantize_fused(
            x,
            fmt,
            granularity,
            axis,
            block_size,
            rule,
            amax,
            pad,
            rounding,
            generator,
            fold,
            hadamard,
            keep_values,
            measure_amax,
        )

    # bf16 and fp16 stay as they are: their amax is exact in them, and dividing them by the fp32
    # scales computes in fp32 (type promotion), so an fp32 copy first would only cost a pass
    matrix = to_matrix(x if x.dtype in _PROMOTE_EXACTLY else x.float(), axis)
    rows, cols = matrix.shape
    block = block_shape(granularity, (rows, cols), block_size)
    blocks = _blocked(_pad_to_blocks(matrix, block, pad), block)  # a view of x when no copy needed
    measured = amax is None or granularity is Granularity.NVFP4
    block_amax = _block_amax(blocks).float() if measured else None  # fp32 once, for every rule
    measured_amax = None
    if measure_amax:  # granularity tensor: the one block's amax (an empty tensor has none: 0)
        one_block = measured and block_amax.numel() == 1
        measured_amax = block_amax.reshape(()) if one_block else tensor_amax(x)

    tensor_scale = None
    if granularity is Granularity.NVFP4:
        amax_of_tensor = tensor_amax(block_amax) if amax is None else amax
        scale, tensor_scale = nvfp4_scales(block_amax, amax_of_tensor)
        divisor = scale * tensor_scale
        divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    else:
        if amax is not None:
            block_amax = _external_block_amax(amax, blocks.shape[0], granularity)
            # an empty tensor has no blocks (no row or no column of them): no scales, as measured
            block_amax = block_amax.expand(blocks.shape[0], 1, blocks.shape[2], 1)
        scale = scale_from_amax(block_amax, fmt, rule)
        divisor = scale

    # `blocks` may be x itself: the first op allocates the temporary every later op may overwrite.
    if _reciprocal_is_exact(rule, granularity):
        scaled = blocks * torch.reciprocal(divisor)  # == blocks / divisor for power-of-two scales
    else:
        scaled = blocks / divisor
    values = cast_to_carrier_(scaled, fmt, carrier_dtype(fmt), rounding, generator)
    if granularity is Granularity.NVFP4:
        empty = ~(scale > 0)  # blocks whose e4m3 scale underflowed to zero (or is NaN) hold zeros
        if empty.any():
            values.masked_fill_(empty, 0)
    values = values.reshape(blocks.shape[0] * block[0], blocks.shape[2] * block[1])
    values = values[:rows, :cols]
    values = from_matrix(values, x.shape, axis)
    return QTensor(
        values=values,
        scale=scale.reshape(blocks.shape[0], blocks.shape[2]),
        fmt=fmt,
        granularity=granularity,
        block=block,
        axis=axis,
        tensor_scale=tensor_scale,
        scale_rule=None if granularity is Granularity.NVFP4 else rule,
        measured_amax=measured_amax,
    )
