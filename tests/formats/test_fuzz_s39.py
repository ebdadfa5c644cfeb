"""Session 39's hunt for bit-exactness gaps of every number format (fuzzed against ml_dtypes through
`cast`, `quantize` at every granularity, the fused kernels and the PyTorch path): it found no
rounding mismatch, but packed dtypes, which every entry point took and then ended in PyTorch's
NotImplementedError ("copy_kernel" not implemented for 'Float4_e2m1fn_x2')."""

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import cast, cast_reference, quantize, tensor_amax

CALLS = {
    "cast": lambda x: cast(x, "fp8_e4m3"),
    "cast_reference": lambda x: cast_reference(x, "fp4_e2m1"),
    "quantize": lambda x: quantize(x, "fp4_e2m1", "mx"),
    "tensor_amax": tensor_amax,
}


def unpacked_by_the_fix(message: str, x: torch.Tensor) -> torch.Tensor:
    """Run the code the message gives as its fix on ``x``; what it leaves in ``x``."""
    names = {"torch": torch, "x": x}
    exec(message.split("float tensor first: ", 1)[1], names)
    return names["x"]


@pytest.mark.parametrize("call", list(CALLS))
def test_a_packed_fp4_tensor_is_refused_in_one_line_with_a_fix_that_works(call):
    codes = torch.randint(
        0, 256, (4, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    x = codes.clone().view(torch.float4_e2m1fn_x2)  # two e2m1 codes a byte: packed MXFP4/NVFP4
    with pytest.raises(UsageError) as caught:
        CALLS[call](x)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{call}() cannot read torch.float4_e2m1fn_x2, a packed dtype")
    assert torch.equal(x.view(torch.uint8), codes)  # the input is left as it was
    unpacked = unpacked_by_the_fix(message, x)
    assert unpacked.dtype == torch.float32 and unpacked.shape == (4, 32)
    CALLS[call](unpacked)  # what the fix gives is taken
    # the first element is the low nibble (torchao's `unpack_uint4` order): 0x71 holds 0.5, then 6
    pair = torch.tensor([[0x71]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    assert unpacked_by_the_fix(message, pair).tolist() == [[0.5, 6.0]]


def test_a_sub_byte_integer_tensor_is_refused_by_quantize_naming_the_unpacking():
    x = torch.zeros(8, dtype=torch.uint8).view(torch.uint4)
    with pytest.raises(UsageError, match=r"^quantize\(\) cannot read torch\.uint4, .*fix: unpack"):
        quantize(x, "int8")
