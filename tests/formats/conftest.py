import ml_dtypes
import numpy as np
import pytest

# lowbit format name -> ml_dtypes/numpy type that serves as the bit-exact reference
REFERENCE_TYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
}

SMALL_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


@pytest.fixture(params=list(REFERENCE_TYPES))
def reference_format(request):
    return request.param, REFERENCE_TYPES[request.param]


@pytest.fixture(params=["fused", "torch"])
def quantize_path(request):
    """Run a test through the fused CPU kernel and through the PyTorch path (CUDA's)."""
    from lowbit import kernels

    if request.param == "torch":
        with kernels.disabled():
            yield request.param
    else:
        assert kernels.available(), f"the fused kernels did not build: {kernels.build_error()}"
        yield request.param
