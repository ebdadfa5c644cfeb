"""Bugs found by a bug hunt through the public interfaces of `lowbit.formats` and `lowbit formats`
(session 24): inputs that crashed where a result or a one-line error was due, and arguments that
were quietly taken for something else, or differently by the fused kernel and the PyTorch path."""

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.formats import cast, quantize
from lowbit.formats.hadamard import random_signs
from tests.formats.test_fast_paths import assert_same_bits

FP8_DTYPES = {
    torch.float8_e4m3fn: ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: ("fp8_e5m2", ml_dtypes.float8_e5m2),
}


@pytest.mark.parametrize("dtype", list(FP8_DTYPES), ids=str)
def test_a_pytorch_fp8_tensor_casts_to_its_own_format(dtype):
    """cast of a float8_e5m2 tensor to fp8_e5m2 raised NotImplementedError ("clamp_scalar_cpu"
    not implemented): PyTorch has no clamp for fp8 dtypes on the CPU."""
    name, reference = FP8_DTYPES[dtype]
    codes = np.arange(256, dtype=np.uint8)
    x = torch.from_numpy(codes.view(reference).astype(np.float32)).to(dtype)
    expected = codes.view(reference).astype(np.float32)
    limit = float(ml_dtypes.finfo(reference).max)
    expected = np.where(np.isinf(expected), np.copysign(limit, expected), expected)  # saturated
    out = cast(x, name)
    assert out.dtype == dtype
    assert_same_bits(out.float(), torch.from_numpy(expected))


@pytest.mark.parametrize("dtype", list(FP8_DTYPES), ids=str)
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp16", "bf16", "int8"])
def test_a_pytorch_fp8_tensor_casts_like_its_fp32_values(dtype, name):
    x = (torch.randn(64) * 8).to(dtype)
    expected = cast(x.float(), name).to(dtype)
    assert_same_bits(cast(x, name).float(), expected.float())


@pytest.mark.parametrize(
    "signs",
    [
        torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(0)).float(),  # 0/1 bits
        torch.full((16,), 2.0),
        torch.arange(16) % 2 == 0,  # bits as bools
    ],
    ids=["bits", "twos", "bool"],
)
def test_hadamard_signs_other_than_plus_or_minus_one_are_refused(signs, quantize_path):
    """0/1 "signs" quietly zeroed half of every transform block (the GEMM of two transformed
    operands was then another GEMM); other values made the transform not orthogonal."""
    x = torch.randn(8, 64)
    with pytest.raises(UsageError, match="must all be \\+1 or -1"):
        quantize(x, "fp4_e2m1", "mx", hadamard=signs)
    for good in (random_signs(16, 0), random_signs(16, 0).to(torch.int64)):
        assert quantize(x, "fp4_e2m1", "mx", hadamard=good).values.shape == (8, 64)


@pytest.mark.parametrize("granularity", ["tensor", "mx", "nvfp4"])
def test_hadamard_of_a_0d_tensor_is_refused_with_the_fix(granularity, quantize_path):
    """A 0-d tensor with hadamard= raised IndexError ("tuple index out of range")."""
    with pytest.raises(UsageError, match="0-d tensor"):
        quantize(torch.tensor(1.5), "fp4_e2m1", granularity, hadamard=random_signs(16, 0))


def test_a_one_element_amax_gives_the_0d_tensor_scale_of_a_scalar_one(quantize_path):
    """NVFP4's tensor scale had the given amax's shape on the PyTorch path ((1,) for a 1-element
    amax) and was 0-d on the fused kernel's."""
    x = torch.randn(8, 64)
    scalar = quantize(x, "fp4_e2m1", "nvfp4", amax=torch.tensor(2.0))
    for amax in (torch.tensor([2.0]), torch.tensor([[2.0]])):
        q = quantize(x, "fp4_e2m1", "nvfp4", amax=amax)
        assert q.tensor_scale.shape == ()
        assert_same_bits(q.tensor_scale, scalar.tensor_scale)
        assert_same_bits(q.values, scalar.values)


@pytest.mark.parametrize("rule", ["amax", "pow2", "mx_ceil"])
@pytest.mark.parametrize(("fmt", "granularity"), [("fp8_e4m3", "tensor"), ("int8", "axis")])
def test_a_negative_given_amax_scales_as_a_zero_one_on_both_paths(
    rule, fmt, granularity, quantize_path
):
    """The fused kernel took a negative amax as scale 1 (as a zero one), the PyTorch path as the
    smallest scale (fp32's smallest normal, or 2**-127), which saturated every value."""
    x = torch.randn(8, 64)
    amax = -1.0 if granularity == "tensor" else torch.full((8,), -1.0)
    q = quantize(x, fmt, granularity, scale_rule=rule, amax=amax)
    assert torch.equal(q.scale, torch.ones_like(q.scale))
    zero = quantize(x, fmt, granularity, scale_rule=rule, amax=amax * 0)
    assert_same_bits(q.values, zero.values)


def test_formats_command_measures_sparse_tensors_as_dense_ones(tmp_path, capsys):
    """A sparse tensor in the file was a NotImplementedError traceback (aten::ne on SparseCPU)."""
    dense = torch.randn(16, 64).masked_fill(torch.rand(16, 64) < 0.5, 0.0)
    torch.save({"w": dense}, tmp_path / "dense.pt")
    torch.save({"w": dense.to_sparse()}, tmp_path / "sparse.pt")
    assert main(["formats", "--tensor", str(tmp_path / "dense.pt")]) == 0
    expected = capsys.readouterr().out
    assert main(["formats", "--tensor", str(tmp_path / "sparse.pt")]) == 0
    assert capsys.readouterr().out == expected


def test_formats_command_refuses_a_file_of_meta_tensors_in_one_line(tmp_path, capsys):
    """Meta tensors (a shape, no values) were a RuntimeError traceback (Tensor.item() on meta)."""
    torch.save({"w": torch.empty(16, 64, device="meta")}, tmp_path / "meta.pt")
    assert main(["formats", "--tensor", str(tmp_path / "meta.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and err.count("\n") == 1 and "with values" in err
