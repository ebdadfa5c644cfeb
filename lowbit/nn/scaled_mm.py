"""Native fp8 GEMMs: PyTorch's scaled matmul (``torch._scaled_mm``) on GPUs with fp8 tensor cores.

An fp8 GEMM whose operands carry tensorwise or row-wise scales (the `fp8-tensorwise`,
`fp8-delayed` and `fp8-rowwise` recipes) runs natively on a CUDA device of compute capability 8.9
or higher (Ada, Hopper, Blackwell): the carrier values (bf16 holding exact fp8 values) are cast to
``float8_e4m3fn`` / ``float8_e5m2`` (exact), and ``torch._scaled_mm`` multiplies them with fp32
accumulation, applies the dequantization scales to the accumulator and rounds once to the output
dtype. That is what `lowbit.nn.gemm.emulated_gemm` computes everywhere else, up to the order of
the fp32 accumulation (and, for row-wise scales that are not powers of two, the emulation's
rounding of the bf16 product before its second pass; fp8-rowwise's are, and fold exactly).

What it takes, otherwise the emulation runs (`native_fp8_kind` returns None):

- both operands fp8 (not both e5m2: cuBLAS has no e5m2 x e5m2 kernel) with scales constant along
  the contraction axis, on one CUDA device of capability >= 8.9;
- tensorwise scales (one per operand), any of fp32/bf16/fp16 out; or row-wise scales (one per row
  of each operand), capability >= 9.0 (PyTorch's row-wise kernel), bf16 out, or fp32 out as the
  bf16 result widened (the row-wise kernel writes bf16 only; a layer's gradients for fp32 inputs
  and weights under autocast are such GEMMs, and the emulation rounds them to bf16 the same way);
- K and N multiples of 16 (cuBLASLt's fp8 layout rule).

`emulated_gemms()` switches the native path off in its context (to compare the two on a GPU).
"""

from __future__ import annotations

import torch

from lowbit.formats import QTensor
from lowbit.threadflag import ThreadFlag

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_TENSORWISE_OUT = (torch.float32, torch.bfloat16, torch.float16)
_ROWWISE_OUT = (torch.bfloat16, torch.float32)  # fp32: the kernel's bf16 output, widened
_emulate = ThreadFlag()


def emulated_gemms():
    """Within this context (this thread) fp8 GEMMs are emulated on every device."""
    return _emulate.on()


def _fp8_capability(values: torch.Tensor) -> tuple[int, int] | None:
    """The CUDA compute capability of ``values``' device; None off CUDA."""
    if values.device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(values.device)


def native_fp8_kind(
    qa: QTensor, qb: QTensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype
) -> str | None:
    """How ``qa @ qb.T`` (scales ``sa`` M x 1 or 1 x 1, ``sb`` N x 1 or 1 x 1) can run as
    ``torch._scaled_mm`` here: with "tensor" or "row" scales, or None (see the module docstring)."""
    capability = _fp8_capability(qa.values)  # None off CUDA: the check every CPU GEMM ends at
    if capability is None or capability < (8, 9) or _emulate:
        return None
    names = (qa.fmt.name, qb.fmt.name)
    if not all(name in _FP8 for name in names) or names == ("fp8_e5m2", "fp8_e5m2"):
        return None
    if qb.values.device != qa.values.device or qa.shape[1] % 16 or qb.shape[0] % 16:
        return None
    if sa.numel() == 1 and sb.numel() == 1:
        return "tensor" if out_dtype in _TENSORWISE_OUT else None
    return "row" if out_dtype in _ROWWISE_OUT and capability >= (9, 0) else None


def scaled_mm(
    qa: QTensor,
    qb: QTensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    out_dtype: torch.dtype,
    kind: str,
) -> torch.Tensor:
    """``(va * sa) @ (vb * sb).T`` by ``torch._scaled_mm`` (``kind`` from `native_fp8_kind`)."""
    # Both row-major (M x K, N x K: b.t() is column-major), cast and laid out in one copy each (a
    # transposed operand's values are column-major).
    row_major = torch.contiguous_format
    a = qa.values.to(_FP8[qa.fmt.name], memory_format=row_major)
    b = qb.values.to(_FP8[qb.fmt.name], memory_format=row_major)
    if kind == "tensor":
        scale_a, scale_b = sa.reshape(()).float(), sb.reshape(()).float()
    else:  # one scale per row of a (M x 1) and per column of the output (1 x N)
        scale_a = sa.float().expand(a.shape[0], 1).contiguous()
        scale_b = sb.float().reshape(1, -1).expand(1, b.shape[0]).contiguous()
    kernel_dtype = out_dtype if kind == "tensor" else torch.bfloat16
    out = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=kernel_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)
