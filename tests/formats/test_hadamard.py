"""Hadamard transforms: Sylvester structure, orthogonality, inverse, and GEMM invariance."""

import math

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats.hadamard import apply_blockwise, hadamard_matrix, random_hadamard


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


def test_apply_blockwise_multiplies_each_block_and_its_transpose_inverts_it():
    h = random_hadamard(16, seed=1, dtype=torch.float64)
    x = torch.randn(5, 3, 48, dtype=torch.float64)
    y = apply_blockwise(x, h)
    for block in range(3):
        cols = slice(16 * block, 16 * (block + 1))
        assert torch.allclose(y[..., cols], x[..., cols] @ h, atol=1e-12)
    assert torch.allclose(apply_blockwise(y, h.t()), x, atol=1e-12)  # inverse: H^T
    # Orthogonal: every block keeps its energy.
    energy = x.reshape(5, 3, 3, 16).pow(2).sum(-1)
    assert torch.allclose(y.reshape(5, 3, 3, 16).pow(2).sum(-1), energy, atol=1e-10)


def test_apply_blockwise_refuses_a_partial_block():
    with pytest.raises(UsageError, match="not a multiple"):
        apply_blockwise(torch.randn(4, 40), hadamard_matrix(16))


@pytest.mark.parametrize("n", [16, 32, 64])
def test_gemm_is_unchanged_by_transforming_both_operands(n):
    h = random_hadamard(n, seed=3, dtype=torch.float64)
    a = torch.randn(24, 4 * n, dtype=torch.float64)
    b = torch.randn(40, 4 * n, dtype=torch.float64)
    transformed = apply_blockwise(a, h) @ apply_blockwise(b, h).t()
    assert torch.allclose(transformed, a @ b.t(), atol=1e-10)


def test_transform_spreads_an_outlier_over_its_block():
    h = random_hadamard(32, seed=0, dtype=torch.float64)
    x = torch.zeros(1, 32, dtype=torch.float64)
    x[0, 5] = 100.0
    y = apply_blockwise(x, h)
    assert torch.allclose(y.abs(), torch.full_like(y, 100 / math.sqrt(32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transposed_matrix_is_transformed_like_its_contiguous_copy(dtype):
    # The weight gradient's operands are transposed views; they take a copy-free path.
    x = torch.randn(96, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    h = random_hadamard(32, seed=3)
    ours = apply_blockwise(x.t(), h)
    reference = apply_blockwise(x.t().contiguous(), h)
    assert ours.shape == (40, 96) and ours.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)
