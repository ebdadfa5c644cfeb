"""Scale rules against the granularities they meet: a rule NVFP4 does not apply is refused rather
than dropped, and MX blocks under the ``amax`` rule (fp32 scales, a deliberate non-OCP variant)
count their scales as fp32 in `QTensor.nbytes_packed`."""

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import quantize
from lowbit.recipes import get_recipe
from lowbit.recipes.recipe import OperandSpec


@pytest.mark.parametrize("rule", ["amax", "pow2", "mx_floor", "mx_ceil"])
def test_a_scale_rule_asked_of_nvfp4_is_refused_not_dropped(rule, quantize_path):
    """``scale_rule="pow2"`` with granularity nvfp4 gave e4m3 block scales (not powers of two)
    without a word, in `quantize` and in an `OperandSpec` alike."""
    x = torch.randn(4, 32)
    with pytest.raises(UsageError, match=r"'nvfp4' sets its own scales.*fix: leave scale_rule out"):
        quantize(x, "fp4_e2m1", "nvfp4", scale_rule=rule)
    with pytest.raises(UsageError, match=rf"scale rule '{rule}' would be ignored"):
        OperandSpec("fp4_e2m1", "nvfp4", scale_rule=rule)
    # without a rule, NVFP4 quantizes as before; the preset's specs carry none
    assert quantize(x, "fp4_e2m1", "nvfp4").tensor_scale is not None
    assert get_recipe("nvfp4").layer.forward.a.scale_rule is None


def test_mx_blocks_under_the_amax_rule_count_fp32_scales(quantize_path):
    """Their scales are any fp32 value (no e8m0 code), yet counted as 8-bit e8m0 scales: the
    packed size read as MX's while the storage is that of 1 x 32 blocks with fp32 scales."""
    x = torch.randn(4, 64)
    fp32_blocks = quantize(x, "fp8_e4m3", "block", block_size=32)
    variant = quantize(x, "fp8_e4m3", "mx", scale_rule="amax")
    assert variant.nbytes_packed == fp32_blocks.nbytes_packed == 4 * 64 + 8 * 4
    for rule in ("mx_floor", "mx_ceil", "pow2"):  # powers of two within e8m0's range
        assert quantize(x, "fp8_e4m3", "mx", scale_rule=rule).nbytes_packed == 4 * 64 + 8
