"""Random Hadamard transforms along a GEMM's contraction axis.

For an orthogonal ``H`` (``H @ H.T = I``) a GEMM over the contraction axis is unchanged when both
operands are transformed: ``(a @ H) @ (b @ H).T = a @ b.T``. Quantizing ``a @ H`` instead of ``a``
spreads an outlier over the ``n`` entries of its block, so blocks hold values of similar magnitude
and fp4 loses less (Tseng et al. 2025, "Training LLMs with MXFP4"; NVIDIA 2025 NVFP4 recipe).

``H = S @ W / sqrt(n)`` with ``W`` the Sylvester-Hadamard matrix of order ``n`` (a power of two) and
``S`` a diagonal of random signs. Applied block-diagonally: the contraction axis is cut into blocks
of ``n`` and each block is multiplied by the same ``H``.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import UsageError


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix of order ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise UsageError(f"Hadamard block size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``diag(random signs) @ hadamard_matrix(n)``: orthogonal, with signs drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n, torch.float64)).to(dtype)


def apply_blockwise(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``x`` with every block of ``n`` entries of its last axis multiplied by ``h`` (n x n).

    The last axis must be a multiple of ``n``. Computed as one ``(numel / n) x n`` by ``n x n``
    GEMM on contiguous rows. A transposed matrix (the weight gradient's ``x.T``, whose blocks run
    down the columns of the contiguous ``x``) is not copied: each block ``x_b`` of ``n`` rows of
    ``x`` becomes ``h.T @ x_b`` (a batched GEMM over contiguous batches, ~4x faster than the copy
    at the default shapes), returned transposed the same way. Reshaping the transposed view into
    strided blocks instead would send ``@`` to a batched GEMM that is ~100x slower on CPU.
    """
    n = h.shape[0]
    if x.shape[-1] % n:
        raise UsageError(
            f"the contraction axis ({x.shape[-1]}) is not a multiple of the Hadamard block ({n})"
        )
    h = h.to(x.dtype)
    if x.dim() == 2 and x.shape[1] > 1 and x.stride() == (1, x.shape[0]):
        rows = x.t()  # contiguous; its blocks are groups of n rows
        blocks = rows.view(rows.shape[0] // n, n, rows.shape[1])
        return torch.matmul(h.t(), blocks).view(rows.shape).t()
    blocks = x.contiguous().reshape(-1, n)
    return (blocks @ h).reshape(x.shape)
