"""The fp8 recipes on a GPU with fp8 tensor cores: PyTorch's scaled matmul against the emulation.

Runs only where CUDA reports compute capability 8.9 or higher (skipped elsewhere, and so on the CPU
machines this project is built on; `tests/nn/test_scaled_mm.py` checks the same path there with
`torch._scaled_mm` replaced by a reference). Run it on a GPU with ``pytest tests/gpu``.
"""

import copy

import pytest
import torch

from lowbit import get_recipe
from lowbit.formats import quantize
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitLinear, emulated_gemm, emulated_gemms

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)",
)
ROWWISE = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def run(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return out.detach().float(), x.grad.float(), layer.weight.grad.float()


@pytest.mark.parametrize("granularity", ["tensor", "axis"])
def test_scaled_mm_matches_the_emulated_gemm(granularity):
    if granularity == "axis" and not ROWWISE:
        pytest.skip("row-wise scaled matmul needs compute capability 9.0")
    torch.manual_seed(0)
    a = torch.randn(256, 512, device="cuda") * torch.exp(torch.randn(256, 1, device="cuda"))
    b = torch.randn(384, 512, device="cuda")
    qa, qb = quantize(a, "fp8_e4m3", granularity), quantize(b, "fp8_e4m3", granularity)
    native = emulated_gemm(qa, qb, torch.bfloat16)
    with emulated_gemms():
        emulated = emulated_gemm(qa, qb, torch.bfloat16)
    reference = qa.dequantize().double() @ qb.dequantize().double().t()
    bound = qa.dequantize().double().abs() @ qb.dequantize().double().abs().t()
    for out in (native, emulated):  # both: exact products, fp32 sums, bf16 rounding
        assert ((out.double() - reference).abs() <= 2**-7 * bound).all()


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise"])
def test_fp8_layers_agree_with_the_emulation_and_keep_their_sqnr_floors(recipe):
    if recipe == "fp8-rowwise" and not ROWWISE:
        pytest.skip("row-wise scaled matmul needs compute capability 9.0")
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=False).cuda()
    x = torch.randn(4, 128, 512, device="cuda")
    grad = torch.randn(4, 128, 256, device="cuda")
    reference = run(copy.deepcopy(linear), x, grad)
    layer = LowbitLinear(copy.deepcopy(linear), get_recipe(recipe).layer)
    native = run(copy.deepcopy(layer), x, grad)
    with emulated_gemms():
        emulated = run(copy.deepcopy(layer), x, grad)
    for name, n, e, r, floor in zip(
        ("output", "input grad", "weight grad"), native, emulated, reference, (25, 18, 17)
    ):
        assert sqnr(e, n) > 40, name  # the same quantized operands, accumulation order apart
        assert sqnr(r, n) > floor, name
