"""The native fp8 GEMM path (`lowbit.nn.scaled_mm`): when it is taken, and what it hands PyTorch.

This machine has no GPU, so `torch._scaled_mm` is replaced by a reference with its documented
contract (fp8 operands, ``b`` column-major, tensorwise 0-d scales or row-wise ``(M, 1)`` and
``(1, N)`` scales, fp32 accumulation, one rounding to ``out_dtype``) and the device check reports
a chosen compute capability; the same GEMMs on a real GPU are in ``tests/gpu``.
"""

import pytest
import torch

import lowbit.nn.scaled_mm as native
from lowbit.formats import quantize
from lowbit.nn import emulated_gemm, emulated_gemms

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CPU tensors live on a GPU of the given capability; record `_scaled_mm` calls."""
    calls = []

    def scaled_mm(a, b, *, scale_a, scale_b, out_dtype):
        assert a.dtype in FP8 and b.dtype in FP8
        assert a.is_contiguous() and b.t().is_contiguous()  # row-major a, column-major b
        m, n = a.shape[0], b.shape[1]
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert (scale_a.shape, scale_b.shape) in ((torch.Size([]),) * 2, ((m, 1), (1, n)))
        calls.append("row" if scale_a.dim() else "tensor")
        assert calls[-1] == "tensor" or out_dtype == torch.bfloat16  # PyTorch's row-wise kernel
        product = a.double() @ b.double()
        return (product * scale_a.double() * scale_b.double()).float().to(out_dtype)

    def use(capability=(9, 0)):
        monkeypatch.setattr(native, "_fp8_capability", lambda values: capability)
        monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
        return calls

    return use


def operands(fmt_a="fp8_e4m3", fmt_b="fp8_e4m3", granularity="tensor", k=64, n=48):
    torch.manual_seed(0)
    a = torch.randn(32, k) * torch.exp(torch.randn(32, 1))
    b = torch.randn(n, k) * 0.05
    return quantize(a, fmt_a, granularity), quantize(b, fmt_b, granularity)


def exact(qa, qb) -> torch.Tensor:
    return qa.dequantize().double() @ qb.dequantize().double().t()


@pytest.mark.parametrize(
    ("fmt_a", "fmt_b", "granularity", "out_dtype", "kind"),
    [
        ("fp8_e4m3", "fp8_e4m3", "tensor", torch.bfloat16, "tensor"),
        ("fp8_e4m3", "fp8_e4m3", "tensor", torch.float32, "tensor"),
        ("fp8_e5m2", "fp8_e4m3", "tensor", torch.bfloat16, "tensor"),  # gradient x weight
        ("fp8_e4m3", "fp8_e4m3", "axis", torch.bfloat16, "row"),
        ("fp8_e4m3", "fp8_e4m3", "axis", torch.float32, "row"),  # the bf16 result, widened
    ],
)
def test_fp8_gemm_runs_as_scaled_mm_with_the_dequantization_scales(
    fake_gpu, fmt_a, fmt_b, granularity, out_dtype, kind
):
    calls = fake_gpu()
    qa, qb = operands(fmt_a, fmt_b, granularity)
    out = emulated_gemm(qa, qb, out_dtype)
    assert calls == [kind] and out.dtype == out_dtype
    # one rounding to out_dtype (bf16 for a row-wise kernel whatever the output), plus the fp32
    # rounding of the dequantized operands in `exact`
    rounding = 2**-8 if out_dtype == torch.bfloat16 or kind == "row" else 2**-23
    reference = exact(qa, qb)
    bound = qa.dequantize().double().abs() @ qb.dequantize().double().abs().t()
    assert ((out.double() - reference).abs() <= rounding * reference.abs() + 2**-23 * bound).all()
    if kind == "row" and out_dtype == torch.float32:
        assert torch.equal(out, emulated_gemm(qa, qb, torch.bfloat16).float())


@pytest.mark.parametrize(
    ("case", "capability", "kwargs", "out_dtype"),
    [
        ("no fp8 tensor cores (Ampere)", (8, 6), {}, torch.bfloat16),
        (
            "e5m2 x e5m2 has no cuBLAS kernel",
            (9, 0),
            {"fmt_a": "fp8_e5m2", "fmt_b": "fp8_e5m2"},
            torch.bfloat16,
        ),
        ("K not a multiple of 16", (9, 0), {"k": 72}, torch.bfloat16),
        ("N not a multiple of 16", (9, 0), {"n": 40}, torch.bfloat16),
        ("row-wise needs Hopper", (8, 9), {"granularity": "axis"}, torch.bfloat16),
        ("row-wise has no fp16 output", (9, 0), {"granularity": "axis"}, torch.float16),
        (
            "not fp8",
            (9, 0),
            {"fmt_a": "int8", "fmt_b": "int8", "granularity": "axis"},
            torch.float32,
        ),
        ("block scales", (9, 0), {"granularity": "mx"}, torch.bfloat16),
        ("not a GPU", None, {}, torch.bfloat16),
    ],
)
def test_other_gemms_stay_emulated(fake_gpu, case, capability, kwargs, out_dtype):
    calls = fake_gpu(capability)
    qa, qb = operands(**kwargs)
    out = emulated_gemm(qa, qb, out_dtype)
    assert calls == [], case
    bound = qa.dequantize().double().abs() @ qb.dequantize().double().abs().t()
    assert ((out.double() - exact(qa, qb)).abs() <= 2**-7 * bound).all()


def test_emulated_gemms_switches_the_native_path_off(fake_gpu):
    calls = fake_gpu()
    qa, qb = operands()
    with emulated_gemms():
        emulated_gemm(qa, qb, torch.bfloat16)
    assert calls == []
    emulated_gemm(qa, qb, torch.bfloat16)
    assert calls == ["tensor"]


def test_a_layer_trains_through_the_native_path(fake_gpu):
    from lowbit import get_recipe
    from lowbit.nn import LowbitLinear

    calls = fake_gpu()
    layer = LowbitLinear(torch.nn.Linear(64, 48, bias=False), get_recipe("fp8-tensorwise").layer)
    x = torch.randn(32, 64, requires_grad=True)
    layer(x).sum().backward()
    assert calls == ["tensor"] * 3  # forward, input gradient, weight gradient
    assert x.grad is not None and layer.weight.grad is not None


def test_a_rowwise_layer_with_fp32_activations_runs_all_three_gemms_natively(fake_gpu):
    from lowbit import get_recipe, kernels
    from lowbit.nn import LowbitLinear

    calls = fake_gpu()
    layer = LowbitLinear(torch.nn.Linear(64, 48, bias=False), get_recipe("fp8-rowwise").layer)
    x = torch.randn(32, 64, requires_grad=True)
    with kernels.disabled():  # quantized as on CUDA: no folded operands
        out = layer(x)
        out.sum().backward()
    assert calls == ["row"] * 3  # fp32 output, input gradient and weight gradient
    assert out.dtype == x.grad.dtype == layer.weight.grad.dtype == torch.float32
