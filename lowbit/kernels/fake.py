"""Fake (meta) implementations of the fused kernels' ops, for tracing with fake tensors.

`torch.export.export`, `torch.compile` and `torch.library.opcheck` run a model on fake tensors
(shapes, dtypes and strides, no data) to record its graph. An op with no fake implementation
stops that: export failed with ``UnsupportedOperatorException: lowbit.quantize_rows.default``
for every quantizing recipe, and compile broke its graph at every quantized operand. Each
function here returns empty tensors of exactly the shapes, dtypes and strides that its C++
kernel returns (the file named in each docstring), so the traced graph calls the real kernels
and gives their bits. `register` is called once, when the library has loaded.
"""

from __future__ import annotations

import torch

_INT_KIND = 1  # quantize_rows' kind for symmetric integer formats (values in int8)
_NVFP4_RULE = 4  # quantize_rows' rule with a tensor scale (e4m3 block scales, fp32 tensor scale)
# quantize_rows' block for one scale per row (`lowbit.kernels.quantize_rows`): a block longer than
# any row, which quantize.cpp takes as one block of the whole row, ceil(cols / block) = 1. Not the
# row's length, which a traced graph (`torch.compile`) holds as a symbolic size where it is a
# batch's token count (a weight gradient's ``grad_out.T``): the C++ op's ``int block`` made
# Dynamo specialize it, so every new batch size compiled the model again, up to its recompile
# limit. The kernel gives the same bits, stochastic rounding's draws included (strided by the
# row's length, quantize.cpp's noise_stride).
ROW_BLOCK = 1 << 62


def quantize_rows(
    x,
    block,
    block_rows,
    kind,
    mbits,
    emin,
    emax,
    fmt_max,
    rule,
    amax,
    noise_seed,
    fold,
    hadamard,
    write_values=True,
    measure_amax=False,
):
    """quantize.cpp's ``quantize_rows`` (and ``lowbit_traced::quantize_rows``'s, `lowbit.kernels`): values
    and folded have the columns padded to whole Hadamard blocks, and a transposed contiguous input
    gives them as transposed views."""
    torch._check(x.dim() == 2, lambda: "quantize_rows needs a 2-D CPU tensor")
    rows, in_cols = x.shape
    cols = in_cols
    if hadamard is not None:
        n = hadamard.numel()
        cols = (in_cols + n - 1) // n * n
    transposed = (
        block > 0
        and block_rows == 1
        and rows > 1
        and in_cols > 1
        and x.stride(0) == 1
        and x.stride(1) == rows
    )

    def operand(dtype):
        if transposed:
            return x.new_empty((cols, rows), dtype=dtype).t()
        return x.new_empty((rows, cols), dtype=dtype)

    def nothing():  # a fresh one each: outputs of a custom op may not alias each other
        return x.new_empty((0, 0), dtype=torch.bfloat16)

    values = (
        operand(torch.int8 if kind == _INT_KIND else torch.bfloat16) if write_values else nothing()
    )
    grid = (1, 1) if block == 0 else (_blocks(rows, block_rows), _blocks(cols, block))
    scale = x.new_empty(grid, dtype=torch.float32)
    tensor_scale = x.new_empty((1 if rule == _NVFP4_RULE else 0,), dtype=torch.float32)
    folded = operand(torch.bfloat16) if fold else nothing()
    measured = x.new_empty((1 if measure_amax else 0,), dtype=torch.float32)
    return values, scale, tensor_scale, folded, measured


def _blocks(length, block) -> int:
    """quantize.cpp's count of blocks along ``length``, ``ceil(length / block)``: 1 for
    `ROW_BLOCK`, whatever a symbolic ``length``."""
    if block == ROW_BLOCK:
        return 1
    return -(-length // block)


def _scale_rows_cols(acc, row, col, out_dtype=None):
    """epilogue.cpp: a contiguous M x N result in fp32 (the default) or bf16."""
    return acc.new_empty((acc.shape[0], acc.shape[1]), dtype=out_dtype or torch.float32)


def _accumulate_in_place(*operands):
    """epilogue.cpp's ``add_scaled_rows_cols_`` and ``add_scaled_blocks_``: they write into their
    first operand and return nothing."""


def _int_rows_linear(qx, sx, weight, bias, w_max, w_rule, rounding, out_dtype):
    """lean_linear.cpp: the contiguous M x N output of ``qx @ quantized(weight).T``."""
    return qx.new_empty((qx.shape[0], weight.shape[0]), dtype=out_dtype)


def _cast_linear_backward(
    grad_out,
    x,
    weight,
    grad_input,
    grad_weight,
    grad_bias,
    grad_input_a,
    grad_input_b,
    grad_weight_a,
    grad_weight_b,
    input_dtype,
    weight_dtype,
    bf16_gemms,
):
    """lean_linear.cpp: contiguous ``grad_out @ weight`` in the input's dtype, ``grad_out.T @ x``
    and the sum of ``grad_out``'s rows in the weight's dtype, None where not asked for."""
    rows, outputs = grad_out.shape
    return (
        grad_out.new_empty((rows, weight.shape[1]), dtype=input_dtype) if grad_input else None,
        grad_out.new_empty((outputs, x.shape[1]), dtype=weight_dtype) if grad_weight else None,
        grad_out.new_empty((outputs,), dtype=weight_dtype) if grad_bias else None,
    )


def _operand_stats(x, values, scale, saturation, subnormal_below=0.0):
    """stats.cpp: the ten float64 entries of `lowbit.diagnostics.stats.STATS`."""
    return x.new_empty((10,), dtype=torch.float64)


def register() -> None:
    """Give every op of the ``lowbit`` library its fake implementation."""
    for name, fake in (
        ("quantize_rows", quantize_rows),
        ("scale_rows_cols", _scale_rows_cols),
        ("add_scaled_rows_cols_", _accumulate_in_place),
        ("add_scaled_blocks_", _accumulate_in_place),
        ("int_rows_linear", _int_rows_linear),
        ("cast_linear_backward", _cast_linear_backward),
        ("operand_stats", _operand_stats),
    ):
        torch.library.register_fake(f"lowbit::{name}", fake)
