"""Power-of-two scales of a block whose amax is near fp32's max (3.4e38), bit for bit against the
rules in numpy and ml_dtypes and against torchao's MX quantizer (session 35).

``mx_floor`` (OCP MX v1.0 §6.3: ``s = 2**(floor(log2 amax) - emax_elem)``) saturates the block's
largest elements to the format's max, and they read back finite. The round-up rules (``mx_ceil``,
torchao's RCEIL, and ``pow2``) never saturate, and an element near fp32's max may round up onto
the next binade: 3.4e38 in e4m3 under scale 2**120 is 256, and 256 * 2**120 = 2**128 reads back
as inf, in torchao's dequantization as in lowbit's."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats import get, quantize

F32_MAX = float(np.finfo(np.float32).max)
BLOCK = [F32_MAX, 3.0e38, 2.0**127 * 1.99, 2.0**127 * 1.5, 1.0, -F32_MAX] + [0.5] * 26
ELEMENTS = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def _reference(name: str, rule: str) -> np.ndarray:
    """The block quantized and read back in numpy: the rule's power-of-two scale, the elements
    ``x / s`` clipped to the format's max and rounded to nearest even by ml_dtypes, and the
    product with the scale in fp32."""
    fmt_max = get(name).max
    amax = max(abs(v) for v in BLOCK)
    if rule == "mx_floor":
        exponent = math.frexp(amax)[1] - 1 - math.floor(math.log2(fmt_max))
    else:  # mx_ceil, pow2: ceil(log2(amax / max)) of the fp32 ratio
        exponent = math.ceil(math.log2(float(np.float32(amax) / np.float32(fmt_max))))
    scale = np.float32(2.0**exponent)
    x = np.array(BLOCK, dtype=np.float32)
    elements = np.clip(x / scale, -fmt_max, fmt_max).astype(ELEMENTS[name]).astype(np.float32)
    with np.errstate(over="ignore"):
        return elements * scale


@pytest.mark.parametrize("rule", ["mx_floor", "mx_ceil", "pow2"])
@pytest.mark.parametrize("name", ELEMENTS)
def test_a_block_near_fp32s_max_reads_back_as_the_rule_gives(name, rule):
    x = torch.tensor(BLOCK).reshape(1, 32)
    for granularity in ("mx", "axis"):
        if granularity == "axis" and rule != "pow2":
            continue
        got = quantize(x, name, granularity, scale_rule=rule).dequantize()[0].numpy()
        want = _reference(name, rule)
        assert got.view(np.int32).tolist() == want.view(np.int32).tolist()
    # the spec's rule saturates and stays finite; the round-up rules reach 2**128 at fp32's max
    assert np.isfinite(want).all() == (rule == "mx_floor")


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
)
@pytest.mark.parametrize(("rule", "mode"), [("mx_floor", "FLOOR"), ("mx_ceil", "RCEIL")])
def test_torchao_reads_such_a_block_back_alike(name, dtype, rule, mode):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    x = torch.tensor(BLOCK).reshape(1, 32)
    scale, data = to_mx(x, dtype, 32, ScaleCalculationMode[mode])
    theirs = data.float() * scale.float().reshape(1, 1)
    mine = quantize(x, name, "mx", scale_rule=rule).dequantize()
    assert torch.equal(mine.view(torch.int32), theirs.view(torch.int32))
