"""Hadamard transforms: Sylvester structure, orthogonality, inverse, and GEMM invariance."""

import math

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import quantize
from lowbit.formats.hadamard import (
    hadamard_matrix,
    padded_length,
    random_hadamard,
    random_signs,
    transform,
)


def test_hadamard_matrix_of_order_4_by_hand():
    expected = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    assert torch.equal(hadamard_matrix(4, torch.float64), expected / 2)


@pytest.mark.parametrize("n", [1, 2, 16, 32, 128])
def test_hadamard_matrix_is_orthogonal_and_symmetric_with_entries_of_one_magnitude(n):
    h = hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.t())  # Sylvester matrices are symmetric: H is its own inverse
    assert torch.equal(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 3, 24])
def test_hadamard_order_must_be_a_power_of_two(n):
    with pytest.raises(UsageError, match="power of two"):
        hadamard_matrix(n)


def test_random_hadamard_is_orthogonal_and_seeded():
    h = random_hadamard(64, seed=7, dtype=torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, random_hadamard(64, seed=7, dtype=torch.float64))
    other = random_hadamard(64, seed=8, dtype=torch.float64)
    assert not torch.equal(h, other)
    # Each row is a row of the Sylvester matrix times a sign: only the signs differ.
    assert torch.equal(h.abs(), hadamard_matrix(64, torch.float64).abs())
    row_signs = (h / hadamard_matrix(64, torch.float64))[:, 0]
    assert torch.equal(row_signs.abs(), torch.ones(64, dtype=torch.float64))
    assert (row_signs == -1).any() and (row_signs == 1).any()


def blockwise(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``x`` with every block of ``n`` entries of its last axis multiplied by ``h`` (float64)."""
    n = h.shape[0]
    return (x.double().reshape(-1, n) @ h.double()).reshape(x.shape)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64, 128])
def test_transform_is_the_random_hadamard_matrix_applied_to_every_block(n):
    x = torch.randn(5, 3, 4 * n, generator=torch.Generator().manual_seed(n))
    y = transform(x, random_signs(n, seed=1))
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(
        y.double(),
        blockwise(x, random_hadamard(n, 1, torch.float64)),
        rtol=0,
        atol=1e-5 * x.abs().max().item(),
    )


def test_transform_is_inverted_by_the_transposed_matrix_and_keeps_every_block_s_energy():
    n = 16
    x = torch.randn(5, 3, 48, dtype=torch.float64)
    y = transform(x, random_signs(n, seed=1)).double()
    assert torch.allclose(blockwise(y, random_hadamard(n, 1, torch.float64).t()), x, atol=1e-5)
    energy = x.reshape(5, 3, 3, n).pow(2).sum(-1)
    assert torch.allclose(y.reshape(5, 3, 3, n).pow(2).sum(-1), energy, rtol=1e-5)


def test_transform_zero_pads_a_partial_block():
    n = 16
    x = torch.randn(4, 40)
    y = transform(x, random_signs(n, seed=2))
    assert y.shape == (4, 48) and padded_length(40, n) == 48
    padded = torch.nn.functional.pad(x, (0, 8))
    assert torch.equal(y, transform(padded, random_signs(n, seed=2)))


@pytest.mark.parametrize("n", [16, 32, 64])
def test_gemm_is_unchanged_by_transforming_both_operands(n):
    signs = random_signs(n, seed=3)
    a = torch.randn(24, 4 * n - 5, dtype=torch.float64)  # K zero-padded to whole blocks
    b = torch.randn(40, 4 * n - 5, dtype=torch.float64)
    transformed = transform(a, signs).double() @ transform(b, signs).double().t()
    assert torch.allclose(transformed, a @ b.t(), atol=1e-4)


def test_transform_spreads_an_outlier_over_its_block():
    x = torch.zeros(1, 32)
    x[0, 5] = 100.0
    y = transform(x, random_signs(32, seed=0))
    assert torch.allclose(y.abs(), torch.full_like(y, 100 / math.sqrt(32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transposed_matrix_is_transformed_like_its_contiguous_copy(dtype):
    x = torch.randn(96, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    signs = random_signs(32, seed=3)
    assert torch.equal(transform(x.t(), signs), transform(x.t().contiguous(), signs))


def test_the_butterflies_run_stage_by_stage_in_a_fixed_order():
    # n = 4, signs +1: stage h=1 pairs (0,1), (2,3); stage h=2 pairs (0,2), (1,3); then / 2.
    # fp32 additions in that order lose the 1.0 below 2**25 in the first stage: the GEMM order
    # (x0 + x2) + (x1 + x3) would keep it. The fused kernel follows the same order bit for bit.
    x = torch.tensor([[2.0**25, 1.0, -(2.0**25), 1.0]])
    ones = torch.ones(4)
    y = transform(x, ones)
    first = [2.0**25 + 1.0, 2.0**25 - 1.0, -(2.0**25) + 1.0, -(2.0**25) - 1.0]  # fp32-rounded
    f = torch.tensor(first, dtype=torch.float32)
    expected = torch.stack([f[0] + f[2], f[1] + f[3], f[0] - f[2], f[1] - f[3]]) / 2
    assert torch.equal(y[0], expected)


@pytest.mark.parametrize(
    ("signs", "message"),
    [(torch.ones(4, 4), "1-D"), (torch.ones(24), "power of two"), (torch.ones(0), "power of two")],
)
def test_bad_signs_are_refused_with_what_they_must_be(signs, message):
    x = torch.randn(8, 64)
    with pytest.raises(UsageError, match=message):
        transform(x, signs)
    with pytest.raises(UsageError, match=message):
        quantize(x, "fp4_e2m1", "mx", hadamard=signs)
