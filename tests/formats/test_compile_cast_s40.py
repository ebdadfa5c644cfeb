"""The public formats functions under `torch.compile` (inductor) give eager's bits.

Before: called alone in a user's compiled function (no converted layer in the graph), `cast` of
an fp32 tensor to bf16 or fp16 lost its rounding: inductor fused the fp32 -> 16-bit -> fp32 round
trip away, so a compiled ``cast(x, "bf16") * 2`` returned ``2 * x`` (4096 of 4096 values off), and
so did `quantize` to fp16/bf16 and `QTensor.dequantize(torch.bfloat16)` read by a later op, unless
the user set ``torch._inductor.config.emulate_precision_casts``. Now they set it when traced, as a
converted layer does (`lowbit.formats.eager_roundings`), unless
``TORCHINDUCTOR_EMULATE_PRECISION_CASTS=0``.
"""

import warnings

import pytest
import torch
import torch._inductor.config as inductor_config

from lowbit.formats import cast, cast_reference, quantize

ENV = "TORCHINDUCTOR_EMULATE_PRECISION_CASTS"


def roundings(x: torch.Tensor) -> list[torch.Tensor]:
    """Several formats and granularities, each read by a later op (which inductor fuses)."""
    return [
        cast(x, "bf16") * 2,
        cast(x, "fp16") * 2,
        cast(x, "fp8_e4m3") * 2,
        cast(x.bfloat16(), "fp4_e2m1").float() * 2,
        cast_reference(x, "fp16") * 2,
        quantize(x, "fp16").dequantize() * 2,
        quantize(x, "bf16", "axis").dequantize() * 2,
        quantize(x, "fp8_e4m3", "mx").dequantize() * 2,
        quantize(x, "fp8_e4m3").dequantize(torch.bfloat16).float() * 2,
    ]


def compiled_from_the_default(fn, *args, backend="inductor"):
    """``fn`` compiled and run with the setting at inductor's default (False), and the setting
    afterwards; the setting restored by torch's ``config.patch``."""
    with inductor_config.patch(emulate_precision_casts=False):
        torch._dynamo.reset()
        out = torch.compile(fn, backend=backend)(*args)
        return out, inductor_config.emulate_precision_casts


@pytest.mark.slow  # inductor compiles C++ for one graph: ~15 s (2 busy cores)
def test_compiled_casts_give_the_eager_bits(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 3
    eager = roundings(x)
    bits, _ = compiled_from_the_default(roundings, x)
    for i, (a, b) in enumerate(zip(eager, bits, strict=True)):
        assert torch.equal(a, b), (i, (a != b).sum().item())


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: cast(x, "bf16"),
        lambda x: cast_reference(x, "fp16"),
        lambda x: quantize(x, "fp8_e4m3").values,
        lambda x: quantize(x, "fp8_e4m3").dequantize(torch.bfloat16),
    ],
    ids=["cast", "cast_reference", "quantize", "dequantize"],
)
def test_a_traced_formats_call_sets_the_setting_unless_the_environment_says_0(fn, monkeypatch):
    x = torch.randn(4, 32)
    monkeypatch.delenv(ENV, raising=False)
    assert compiled_from_the_default(fn, x, backend="eager")[1] is True
    monkeypatch.setenv(ENV, "0")
    assert compiled_from_the_default(fn, x, backend="eager")[1] is False


def test_a_traced_cast_to_a_16_bit_format_warns_nothing(monkeypatch):
    """Dynamo warned that it ignores a `functools.cache` (`cast`'s check that ``x``'s dtype holds
    the format's max): noise in a user's compile log, for a cache of no use when traced."""
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # Dynamo's once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_from_the_default(lambda x: cast(x, "bf16"), torch.randn(8), backend="eager")
    assert [str(w.message) for w in caught] == []
