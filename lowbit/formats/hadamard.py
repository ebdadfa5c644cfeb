"""Random Hadamard transforms along a GEMM's contraction axis.

For an orthogonal ``H`` (``H @ H.T = I``) a GEMM over the contraction axis is unchanged when both
operands are transformed: ``(a @ H) @ (b @ H).T = a @ b.T``. Quantizing ``a @ H`` instead of ``a``
spreads an outlier over the ``n`` entries of its block, so blocks hold values of similar magnitude
and fp4 loses less (Tseng et al. 2025, "Training LLMs with MXFP4"; NVIDIA 2025 NVFP4 recipe).

``H = S @ W / sqrt(n)`` with ``W`` the Sylvester-Hadamard matrix of order ``n`` (a power of two) and
``S`` a diagonal of random signs. Applied block-diagonally: the contraction axis is cut into blocks
of ``n`` and each block is multiplied by the same ``H``.

`transform` computes ``x @ H`` as a fast Walsh-Hadamard transform (``log2 n`` butterfly stages,
``n log2 n`` additions per block instead of a GEMM's ``n**2`` multiply-adds), in fp32 and in one
fixed order, so that the fused CPU quantization kernel (`lowbit.kernels`, which transforms each
block while it quantizes it) produces the same bits: ``y = x * s`` (exact: sign flips), then for
``h = 1, 2, ..., n/2`` every pair ``(y[j], y[j + h])`` with ``j mod 2h < h`` becomes
``(y[j] + y[j + h], y[j] - y[j + h])``, then ``y * fp32(1 / sqrt(n))`` (exact when ``n`` is a
power of four, as the recipes' 16 and 64 are).
"""

from __future__ import annotations

import math

import torch

from lowbit.dynamo_marks import assume_constant_result
from lowbit.errors import UsageError
from lowbit.formats.cast import check_real


def _check_order(n: int) -> None:
    if n < 1 or n & (n - 1):
        raise UsageError(f"Hadamard block size must be a power of two, got {n}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix of order ``n`` (a power of two)."""
    _check_order(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


# A pure function of its arguments, so Dynamo may run it while tracing and keep the tensor: a
# `torch.Generator` made inside a traced graph breaks it, and a model compiled before its first
# eager step draws its layers' signs there (in each `mxfp4` layer's backward: its autograd
# function ran eagerly).
@assume_constant_result
def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` random signs (fp32 +-1) drawn from ``seed``: the diagonal ``S`` of the transform."""
    _check_order(n)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).float()


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H = diag(random_signs(n, seed)) @ hadamard_matrix(n)``: orthogonal, as a matrix."""
    signs = random_signs(n, seed).double()
    return (signs[:, None] * hadamard_matrix(n, torch.float64)).to(dtype)


def check_signs(signs: torch.Tensor) -> None:
    """Raise a `UsageError` unless ``signs`` is what `random_signs` returns: 1-D, power-of-two long,
    every entry +1 or -1 (0/1 bits would zero half of every block, other values would make the
    transform not orthogonal: a GEMM of two transformed operands would quietly be another one).
    The entries are checked on the CPU only: elsewhere reading the check would wait for the device."""
    if signs.dim() != 1:
        raise UsageError(
            "Hadamard signs must be a 1-D tensor such as random_signs(n, seed), "
            f"got shape {tuple(signs.shape)}"
        )
    _check_order(signs.numel())
    if torch.compiler.is_compiling():  # Dynamo cannot guard on the cache (an internal error)
        return  # and an entries' check would be a data-dependent branch: checked eagerly only
    if signs.device.type != "cpu" or _SIGNS_CHECKED.get(id(signs)) == (signs, signs._version):
        return  # (a layer's signs are checked once, not at every quantization: ~13 us each)
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise UsageError(
            "Hadamard signs must all be +1 or -1, got values such as "
            f"{signs[(signs != 1) & (signs != -1)][0].item()!r}; fix: random_signs(n, seed), "
            "or 2 * bits - 1 for random 0/1 bits"
        )
    if len(_SIGNS_CHECKED) > 64:  # fresh signs at every call: keep the cache small
        _SIGNS_CHECKED.clear()
    _SIGNS_CHECKED[id(signs)] = (signs, signs._version)


# Sign tensors whose entries were checked, by id: (the tensor, its version counter then). An entry
# holds its tensor, so that its id is not reused while it is in the cache.
_SIGNS_CHECKED: dict[int, tuple[torch.Tensor, int]] = {}


def padded_length(k: int, n: int) -> int:
    """``k`` rounded up to whole blocks of ``n``: the transformed contraction axis."""
    return -(-k // n) * n


def transform(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x @ H`` on every block of ``n = len(signs)`` entries of the last axis (fp32, contiguous).

    The last axis is zero-padded to whole blocks first (zeros add nothing to a GEMM over it), so
    the result's last axis is `padded_length`. Computed by butterflies in the order the module
    docstring gives, which the fused kernel follows bit for bit.
    """
    check_real(x, "transform", integers=True)
    check_signs(signs)
    n = signs.numel()
    cols = x.shape[-1]
    padded = padded_length(cols, n)
    signs = signs.to(x.device, torch.float32).repeat(padded // n)
    # fp32 by type promotion (16-bit values are exact in fp32; times +-1 is exact)
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.float()
    # The padding zeros are multiplied by their signs too (-1 * 0 = -0.0), as the kernel does:
    # a block of zeros then sums to the same signed zeros on both paths.
    padding = signs[cols:] * 0.0
    # Dynamo refuses ``out=`` tensors that are not contiguous (a graph break, which in a layer's
    # backward ran its whole autograd function eagerly): a traced graph writes new tensors, the
    # same values; eagerly each stage writes its two halves in place (two ops, no copy).
    compiling = torch.compiler.is_compiling()
    if compiling:
        y = torch.cat((x * signs[:cols], padding.expand(*x.shape[:-1], padded - cols)), dim=-1)
    else:  # written row-major whatever x's layout, so that the butterflies reshape without a copy
        y = torch.empty((*x.shape[:-1], padded), dtype=torch.float32, device=x.device)
        torch.mul(x, signs[:cols], out=y[..., :cols])
        y[..., cols:] = padding
    shape = y.shape
    h = 1
    while h < n:
        pairs = y.reshape(-1, n // (2 * h), 2, h)  # groups of 2h within each block: (a, b) halves
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        if compiling:
            y = torch.stack((a + b, a - b), dim=2)
        else:
            y = torch.empty_like(pairs)
            torch.add(a, b, out=y[:, :, 0])
            torch.sub(a, b, out=y[:, :, 1])
        h *= 2
    return y.reshape(shape).mul_(torch.tensor(1 / math.sqrt(n), dtype=torch.float32))
