"""Emulated low-precision GEMMs: exact low-precision operands, fast higher-precision arithmetic.

Both operands arrive quantized along the contraction axis K (their last axis): ``a`` is M x K, ``b``
is N x K, and the result is ``a @ b.T`` in fp32. Every 4-, 6- and 8-bit float value is exactly
representable in bf16, and the product of two bf16 values is exact in fp32, so a bf16 GEMM with
fp32 accumulation computes the low-precision GEMM exactly up to the order of the accumulation.
The scales are applied by where they vary:

- constant along K (tensor, per row): the GEMM runs on the raw values and the output is scaled,
  ``out[m, n] = (va @ vb.T)[m, n] * sa[m] * sb[n]``; power-of-two row scales (fp8-rowwise) are
  instead folded into the values by the quantization kernel, as below, so no pass over the output
  is needed.
- varying along K with power-of-two scales (MX e8m0, pow2) or NVFP4's e4m3 block scales: the block
  scale is folded into the values first. ``v * 2**e`` only moves the exponent, and an e2m1 value
  (2 significant bits) times an e4m3 scale (4 bits) has at most 6 significant bits, so the folded
  operand is still exact in bf16 (within bf16's exponent range).
- varying along K with fp32 scales (DeepSeek-V3 1x128 / 128x128 blocks): one GEMM per K block,
  ``out = sum_k (va_k @ vb_k.T) * sa_k * sb_k``, the per-block partial products scaled and
  accumulated in fp32 (DeepSeek-V3 §3.3 promotes partial sums to fp32 the same way).

Integer operands use PyTorch's int8 GEMM (``torch._int_mm``, exact int32 accumulation; `int_mm`).
fp16 and fp32 operands do not fit bf16 and run as fp32 GEMMs (fp16 products are exact in fp32).

On CPU, PyTorch's bf16 GEMM rounds its fp32 accumulator to a bf16 output. That is what a GPU GEMM
with a bf16 output does too; `exact_accumulation()` switches to fp32 GEMMs (slower) so tests can
compare against a float64 reference GEMM with a tight tolerance. Where one scale is left for the
whole output (tensorwise operands; MX and NVFP4 after folding) and the layer wants bf16, the CPU
GEMM multiplies its fp32 accumulator by that scale before the one rounding to bf16, as a GPU's
scaled GEMM does in its epilogue (emulation on a GPU scales the bf16 output instead: reading the
scale as a number there would wait for the device); per-row and per-column scales are applied to
the bf16 output in a second pass (`scale_rows_cols`).
"""

from __future__ import annotations

import torch

from lowbit import kernels
from lowbit.formats import IntFormat, QTensor, unit_scale
from lowbit.nn.scaled_mm import native_fp8_kind, scaled_mm
from lowbit.threadflag import ThreadFlag

_exact = ThreadFlag()


def exact_accumulation():
    """Within this context emulated GEMMs return fp32 accumulators instead of bf16 outputs."""
    return _exact.on()


def bf16_outputs() -> bool:
    """Whether GEMMs of two bf16 operands give bf16 outputs now (outside `exact_accumulation`)."""
    return not _exact


def _constant_along_k(q: QTensor) -> bool:
    return q.block[1] >= q.shape[-1]


def _row_scale(q: QTensor) -> torch.Tensor:
    """Per-row scale (rows x 1, or 1 x 1 when one scale covers all rows) of an operand whose
    scale is constant along K."""
    grid = q.effective_scale()
    if grid.shape == (1, 1):
        return grid  # unit_scale stays itself (see emulated_gemm)
    if grid.shape[0] == 1:
        return grid.reshape(1, 1)
    if q.block[0] == 1:  # one scale per row already (row-wise): no copy
        return grid[: q.shape[0]]
    return grid.repeat_interleave(q.block[0], 0)[: q.shape[0]]


def _fold(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values with the block scales folded in, remaining scale: 1 x 1, `unit_scale` itself when
    there is none)."""
    rest = (
        q.tensor_scale.reshape(1, 1) if q.tensor_scale is not None else unit_scale(q.scale.device)
    )
    if q.folded is not None:  # the fused quantization kernel already folded them
        return q.folded, rest
    rows, cols = q.shape
    block_rows, block_cols = q.block
    if block_rows == 1 and cols % block_cols == 0:  # 1-D blocks: broadcast, no expanded copy
        blocks = q.values.reshape(rows, cols // block_cols, block_cols).to(torch.float32, copy=True)
        folded = blocks.mul_(q.scale[:, :, None]).reshape(rows, cols).to(q.values.dtype)
    else:
        block_scale = q.scale.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
        folded = (q.values.float() * block_scale[:rows, :cols]).to(q.values.dtype)
    return folded, rest


def _bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a @ b.T`` runs as a bf16 GEMM with a bf16 output (both bf16, not `exact_accumulation`)."""
    return a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and not _exact


def _operand(q: QTensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(GEMM operand, the scale left per row or for all) of ``q``: its values with the block scales
    folded in where the kernel folded them (power-of-two row scales included, which then need no
    pass over the output) or where they vary along K and fold exactly; its raw values and row
    scales where the scales are constant along K; (None, None) for `_grouped_mm`."""
    constant = _constant_along_k(q)
    if q.folded is not None or (not constant and q.scales_fold_exactly):
        return _fold(q)
    return (q.values, _row_scale(q)) if constant else (None, None)


# CUDA's int8 GEMM takes more than 16 rows and inner and output widths that are multiples of 8.
_CUDA_INT_MM_MIN_ROWS = 17
_CUDA_INT_MM_MULTIPLE = 8


def int_mm(a: torch.Tensor, b: torch.Tensor, *, pad: bool | None = None) -> torch.Tensor:
    """``a @ b`` of int8 matrices (M x K and K x N) with exact int32 sums, by ``torch._int_mm``.

    On CUDA, whose kernel refuses M <= 16 and K or N not multiples of 8 (a decoding step's single
    row; a first convolution's K of 9), the operands are first zero-padded to those sizes and the
    result cut back: zero rows and columns add nothing to an integer sum, so it is the same result.
    ``pad`` forces the padding on or off (default: on CUDA). On CPU a contraction of K = 1 (a
    layer with one input feature) is padded to 2: PyTorch's CPU kernel returns wrong sums there
    when N > 1 (torch 2.13, every M)."""
    if pad is None:
        pad = a.device.type == "cuda"
    (m, k), n = a.shape, b.shape[1]
    rows = max(0, _CUDA_INT_MM_MIN_ROWS - m) if pad else 0
    inner = (-k) % _CUDA_INT_MM_MULTIPLE if pad else int(k == 1 and a.device.type == "cpu")
    cols = (-n) % _CUDA_INT_MM_MULTIPLE if pad else 0
    if not (rows or inner or cols):
        return torch._int_mm(a, b)
    a = torch.nn.functional.pad(a, (0, inner, 0, rows))
    # b padded as its N x K transpose, so that it stays the column-major view it came as
    b = torch.nn.functional.pad(b.t(), (0, inner, 0, cols)).t()
    return torch._int_mm(a, b)[:m, :n]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``: a bf16 GEMM with a bf16 output when both are bf16 (unless exact), else fp32."""
    if _bf16_gemm(a, b):
        return a @ b.t()
    return a.float() @ b.float().t()


def cast_gemm(a: torch.Tensor, b: torch.Tensor, dtypes: tuple, out_dtype: torch.dtype):
    """``a @ b.T`` of two operands that are plain casts to ``dtypes`` (fp32/bf16/fp16, no scales):
    the same bits as `emulated_gemm` of the cast operands, without building `QTensor`s (the bf16
    backward GEMMs of ``int8``; this saves ~0.1 ms of Python per GEMM, scratch timing)."""
    out = _mm(a.to(dtypes[0]), b.to(dtypes[1]))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _scaled_bf16_mm(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(a @ b.T) * scale`` for bf16 ``a``, ``b`` and one fp32 ``scale``, rounded to bf16 once.

    The scale multiplies the GEMM's fp32 accumulator before its single rounding to the bf16
    output (``addmm``'s ``alpha``), as a GPU's scaled GEMM applies its scales in the epilogue; no
    second pass over the output, and no second rounding. ``alpha`` is a number, which a traced
    graph (`torch.compile`) cannot read from a tensor (a graph break in every tensorwise layer's
    forward under autocast), so there the same computation is one op that reads it at run time,
    `_traced_scaled_bf16_mm`: no tensor-only form gives these bits (an fp32 GEMM times the scale,
    rounded to bf16, differs in the last bit of a few outputs)."""
    if torch.compiler.is_compiling():
        return _traced_scaled_bf16_mm(a, b, scale)
    alpha = scale.item()
    if alpha == 1.0:
        return a @ b.t()
    ignored = _constant(0.0, (), torch.bfloat16, a.device)  # addmm's input, weighted by beta=0
    return torch.addmm(ignored, a, b.t(), beta=0, alpha=alpha)


@torch.library.custom_op("lowbit_traced::scaled_bf16_mm", mutates_args=())
def _traced_scaled_bf16_mm(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_scaled_bf16_mm` as a traced graph calls it (the operands' values come from a quantization
    that needs no gradient, so the op needs no derivative)."""
    return _scaled_bf16_mm(a, b, scale)


@_traced_scaled_bf16_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


# Partial products of at most this many bytes per batched GEMM in `_grouped_mm` (K blocks are
# taken in chunks, so a large layer's M x N x K/block partials are never all alive at once).
_PARTIALS_BYTES = 16 * 2**20
# Up to this many K blocks, `_grouped_mm` runs a GEMM per block on column slices of the operands:
# the batched GEMM's zero padding and contiguous copies cost more than it saves (a 4096 x 344
# activation in 3 blocks of 128: 2.0 ms batched, 1.2 ms block by block; scratch timing).
_FEW_K_BLOCKS = 4


def _grouped_mm(qa: QTensor, qb: QTensor) -> torch.Tensor:
    """Per-K-block GEMMs with fp32 scales, accumulated in fp32 (DeepSeek-V3 style):
    ``out = sum_k (va_k @ vb_k.T) * sa_k * sb_k``, each partial product rounded as `_mm` rounds
    it, scaled and added to the fp32 sum in increasing k. With more than a few K blocks the partial
    products of a chunk of blocks come from one batched GEMM (~4x faster than a GEMM per block at
    32 blocks of 128) and are scaled and summed in one pass (`add_scaled_blocks_`)."""
    block = qa.block[1] if not _constant_along_k(qa) else qb.block[1]
    # (blocks, rows) with contiguous rows, so that each block's scales are a contiguous slice
    scale_a = _k_block_scale(qa, block).contiguous()
    scale_b = _k_block_scale(qb, block).contiguous()
    rows, cols = qa.shape[0], qb.shape[0]
    out = torch.zeros(rows, cols, dtype=torch.float32, device=qa.values.device)
    if scale_a.shape[0] <= _FEW_K_BLOCKS:  # a GEMM per block on column slices, no copies
        for index, start in enumerate(range(0, qa.shape[1], block)):
            columns = slice(start, start + block)
            partial = _mm(qa.values[:, columns], qb.values[:, columns])
            add_scaled_rows_cols_(out, partial, scale_a[index, :, None], scale_b[index, :, None])
        return out
    a, b = _k_blocks(qa.values, block), _k_blocks(qb.values, block)  # (blocks, rows, block)
    chunk = max(1, _PARTIALS_BYTES // (rows * cols * 4))
    for start in range(0, a.shape[0], chunk):
        part = slice(start, start + chunk)
        add_scaled_blocks_(out, _bmm(a[part], b[part]), scale_a[part], scale_b[part])
    return out


def _k_blocks(values: torch.Tensor, block: int) -> torch.Tensor:
    """An R x K operand as K/block R x block matrices (K zero-padded to whole blocks: zeros add
    nothing to a product), in the layout a batched GEMM reads fastest (scratch timing, 32 blocks of
    128 x 128: 0.22 ms as column-major views, 0.77 ms after a copy; row-major views the reverse)."""
    pad = (-values.shape[1]) % block
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    rows, k = values.shape
    blocks = values.view(rows, k // block, block).transpose(0, 1)
    # Column-major (a transposed operand): BLAS takes the blocks as they are. Row-major blocks,
    # whose row stride is the whole row, are faster copied. A traced graph (`torch.compile`)
    # copies both without reading the stride (see `_epilogue_takes`); the products are the same.
    if torch.compiler.is_compiling() or values.stride(0) != 1:
        return blocks.contiguous()
    return blocks


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` per batch entry, rounded as `_mm` rounds a single product."""
    if _bf16_gemm(a, b):
        return torch.bmm(a, b.transpose(1, 2))
    return torch.bmm(a.float(), b.float().transpose(1, 2))


def _k_block_scale(q: QTensor, block: int) -> torch.Tensor:
    """Scale of every (K block, row) pair: shape (K/block, rows)."""
    grid = q.effective_scale().repeat_interleave(q.block[0], 0)[: q.shape[0]]
    blocks = -(-q.shape[1] // block)
    if _constant_along_k(q):
        return grid[:, :1].t().expand(blocks, -1)
    if q.block[1] != block:
        raise ValueError(f"operands have different K blocks ({q.block[1]} vs {block})")
    return grid.t()


def _epilogue_takes(acc: torch.Tensor) -> bool:
    """The fused epilogue (`lowbit.kernels`) serves this accumulator: CPU, unit column stride.

    Not in a traced graph (`torch.compile`), which takes the PyTorch ops (the same bits): Dynamo
    refuses to read a stride in an autograd function's backward and traces that backward again,
    and that second trace left the layer's ``torch.autocast(enabled=False)`` entered, so the
    rest of the model was traced without autocast (torch 2.13: "Global autocast state changed
    while dynamo tracing" from `torch._dynamo.explain`, other numbers from `torch.compile`)."""
    if torch.compiler.is_compiling():
        return False
    return kernels.usable(acc) and (acc.stride(-1) == 1 or acc.shape[-1] <= 1)


def scale_rows_cols(
    acc: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(acc.float() * row) * col.T`` for an M x N accumulator (int32, fp32 or bf16), row scales of
    shape (M, 1) or (1, 1) and column scales (N, 1) or (1, 1): fp32, two roundings in that order,
    then rounded to ``out_dtype``. One fused pass on CPU (`lowbit.kernels`) for fp32 and bf16
    outputs, PyTorch ops elsewhere; the same bits."""
    if out_dtype in (torch.float32, torch.bfloat16) and _epilogue_takes(acc):
        return kernels.scale_rows_cols(acc, row, col, out_dtype)
    return acc.to(torch.float32, copy=True).mul_(row).mul_(col.t()).to(out_dtype)


def add_scaled_rows_cols_(
    out: torch.Tensor, acc: torch.Tensor, row: torch.Tensor, col: torch.Tensor
) -> torch.Tensor:
    """``out += (acc.float() * row) * col.T`` (fp32 ``out``; scales shaped as in
    `scale_rows_cols`): one fused pass on CPU, PyTorch ops elsewhere; the same bits."""
    if _epilogue_takes(acc) and out.is_contiguous():
        return kernels.add_scaled_rows_cols_(out, acc, row, col)
    return out.add_(acc.to(torch.float32, copy=True).mul_(row).mul_(col.t()))


def add_scaled_blocks_(
    out: torch.Tensor, partials: torch.Tensor, row: torch.Tensor, col: torch.Tensor
) -> torch.Tensor:
    """``out += (partials[k].float() * row[k]) * col[k].T`` for k = 0, 1, ... in turn (fp32
    ``out`` M x N, ``partials`` blocks x M x N, ``row`` blocks x M, ``col`` blocks x N): one fused
    pass on CPU, an `add_scaled_rows_cols_` per block elsewhere (and in a traced graph, which
    must not read ``out``'s layout, see `_epilogue_takes`); the same bits."""
    if not torch.compiler.is_compiling() and kernels.usable(partials) and out.is_contiguous():
        return kernels.add_scaled_blocks_(out, partials, row, col)
    for partial, row_k, col_k in zip(partials, row, col):
        add_scaled_rows_cols_(out, partial, row_k[:, None], col_k[:, None])
    return out


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(value: float, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor filled with ``value``, made once per (value, shape, dtype, device); never written."""
    key = (value, shape, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.full(shape, value, dtype=dtype, device=device)
    return _CONSTANTS[key]


def _int_gemm(qa: QTensor, qb: QTensor, row: torch.Tensor, col: torch.Tensor, out_dtype):
    # b as the transposed view of its N x K rows: faster in oneDNN than a K x N copy
    acc = int_mm(qa.values.contiguous(), qb.values.contiguous().t())
    return scale_rows_cols(acc, row, col, out_dtype)


def emulated_gemm(qa: QTensor, qb: QTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(qa) @ dequantize(qb).T`` computed on the low-precision values: the fp32 result,
    rounded to ``out_dtype`` (in the same pass as the scaling where the kernel serves it). fp8
    operands with tensorwise or row-wise scales on a GPU with fp8 tensor cores run natively
    (`lowbit.nn.scaled_mm`)."""
    if isinstance(qa.fmt, IntFormat) and isinstance(qb.fmt, IntFormat):
        if _constant_along_k(qa) and _constant_along_k(qb):
            return _int_gemm(qa, qb, _row_scale(qa), _row_scale(qb), out_dtype)
        return _grouped_mm(qa, qb).to(out_dtype)
    va, sa = _operand(qa)
    vb, sb = _operand(qb)
    if va is None or vb is None:
        return _grouped_mm(qa, qb).to(out_dtype)
    # raw values (not MX, NVFP4); `values` is read only where it was stored, not recovered
    raw = qa.folded is None and qb.folded is None and va is qa.values and vb is qb.values
    if raw and not _exact:
        kind = native_fp8_kind(qa, qb, sa, sb, out_dtype)
        if kind:  # a GPU with fp8 tensor cores: PyTorch's scaled matmul
            return scaled_mm(qa, qb, sa, sb, out_dtype, kind)
    unit = unit_scale(va.device)
    if sa is unit and sb is unit:  # no scales (folded MX; bf16 casts): multiplying by 1 is a no-op
        out = _mm(va, vb)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    if sa.numel() == 1 and sb.numel() == 1:  # tensorwise: one multiplication by sa * sb
        # on CPU (where reading the scale as a number costs no device sync)
        if out_dtype == torch.bfloat16 and _bf16_gemm(va, vb) and va.device.type == "cpu":
            return _scaled_bf16_mm(va, vb, sa * sb)
        out = _mm(va, vb)
        return scale_rows_cols(out, sa * sb, unit, out_dtype)
    return scale_rows_cols(_mm(va, vb), sa, sb, out_dtype)
