import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import quantize
from lowbit.formats.error import sqnr
from lowbit.infer import QuantLinear, QuantRecipe, modules
from lowbit.infer import onednn as onednn_probe
from lowbit.infer.quant import (
    check_divides,
    quantize_per_token_int8,
    quantize_weight,
    weight_qtensor,
)

# (recipe args, what lowbit.formats.quantize is given, stored element dtype, bytes per element)
CASES = {
    "int8": (("int8",), ("int8", "axis", None), torch.int8, 1.0),
    "int8-g32": (("int8", "weights-only", 32), ("int8", "block", 32), torch.int8, 1.0),
    "int4": (("int4",), ("int4", "block", 32), torch.uint8, 0.5),
    "fp8": (("fp8",), ("fp8_e4m3", "axis", None), torch.float8_e4m3fn, 1.0),
    "mxfp4": (("mxfp4",), ("fp4_e2m1", "mx", None), torch.uint8, 0.5),
    "nvfp4": (("nvfp4",), ("fp4_e2m1", "nvfp4", None), torch.uint8, 0.5),
}


def weight(n=48, k=96, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("case", list(CASES))
def test_stored_encoding_is_lossless_and_narrow(case):
    args, (fmt, gran, block), dtype, per_element = CASES[case]
    recipe = QuantRecipe(*args)
    w = weight()
    stored = quantize_weight(w, recipe)
    assert stored["qweight"].dtype == dtype
    assert stored["qweight"].numel() * stored["qweight"].element_size() == w.numel() * per_element
    reference = quantize(w, fmt, gran, axis=-1, block_size=block).dequantize()
    assert torch.equal(weight_qtensor(stored, w.shape[1], recipe).dequantize(), reference)


def test_per_token_int8_fast_path_equals_the_reference_bit_for_bit():
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * 3
    x[4] = 0  # a zero row keeps scale 1
    x[5, 3] = float(2**-140)  # a tiny row
    values, scale = quantize_per_token_int8(x)
    reference = quantize(x, "int8", "axis", axis=-1)
    assert torch.equal(values, reference.values)
    assert torch.equal(scale, reference.scale)


@pytest.mark.parametrize(
    "args, floor_db",
    [
        (("int8", "weights-only"), 38),
        (("int8", "weights-and-activations"), 33),
        (("int4", "weights-only", 32), 16),
        (("fp8", "weights-and-activations"), 22),
        (("mxfp4", "weights-and-activations"), 10),
        (("nvfp4", "weights-only"), 16),
    ],
)
def test_quantized_linear_tracks_the_fp32_layer(args, floor_db):
    linear = torch.nn.Linear(96, 48)
    x = torch.randn(4, 10, 96, generator=torch.Generator().manual_seed(2))
    layer = QuantLinear.from_linear(linear, QuantRecipe(*args))
    with torch.no_grad():
        out, ref = layer(x), linear(x)
    assert out.shape == ref.shape
    assert sqnr(ref, out) > floor_db


def test_int8_kernels_agree_with_the_dequantized_reference():
    linear = torch.nn.Linear(96, 48, bias=False)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(3))
    wa = QuantLinear.from_linear(linear, QuantRecipe("int8", "weights-and-activations"))
    qx = quantize(x, "int8", "axis", axis=-1)
    expected = qx.dequantize() @ wa.dequantized_weight().t()
    with torch.no_grad():
        torch.testing.assert_close(wa(x), expected, rtol=1e-5, atol=1e-5)
    wo = QuantLinear.from_linear(linear, QuantRecipe("int8"))
    with torch.no_grad():
        dequant = wo(x)
        wo.kernel = "int8pack"
        wo._cache.clear()
        int8pack = wo(x)
    torch.testing.assert_close(int8pack, dequant, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dequant, x @ wo.dequantized_weight().t(), rtol=1e-6, atol=1e-6)


def test_int8_gemm_on_onednn_equals_the_int_mm_path(monkeypatch):
    """oneDNN's prepacked quantized linear (x86) and torch._int_mm compute the same exact int32
    products; only the order of the two fp32 scale multiplications differs. oneDNN is forced on
    (on a CPU where the probe finds it slow, W8A8 layers would not call it)."""
    if not hasattr(torch.ops.onednn, "qlinear_prepack"):
        pytest.skip("this PyTorch build has no oneDNN quantized linear")
    monkeypatch.setattr(modules, "onednn_int8_is_fast", lambda: True)
    linear = torch.nn.Linear(128, 344, bias=True)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 3
    layer = QuantLinear.from_linear(linear, QuantRecipe("int8", "weights-and-activations"))
    with torch.no_grad():
        onednn = layer(x)
        assert "oneDNN qlinear" in layer.note()
        layer._cache.clear()
        monkeypatch.setattr(modules, "onednn_int8_is_fast", lambda: False)
        assert "torch._int_mm" in layer.note() and "oneDNN" not in layer.note()
        fallback = layer(x)
    torch.testing.assert_close(onednn, fallback, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("onednn_s", "int_mm_s", "fast"),
    [(1e-5, 1e-5, True), (4e-5, 1e-5, True), (5e-5, 1e-5, False), (1e-2, 1e-5, False)],
)
def test_onednn_is_used_unless_it_is_several_times_slower(monkeypatch, onednn_s, int_mm_s, fast):
    """The probe times oneDNN's qlinear, then torch._int_mm; oneDNN is kept up to SLOWER (4x)
    slower, a margin timing noise does not cross (an AMD EPYC's reference fallback: ~3000x)."""
    if not hasattr(torch.ops.onednn, "qlinear_prepack"):
        pytest.skip("this PyTorch build has no oneDNN quantized linear")
    times = iter([onednn_s, int_mm_s])
    monkeypatch.setattr(onednn_probe, "_best_of", lambda fn: next(times))
    assert onednn_probe.onednn_int8_is_fast.__wrapped__() is fast


def test_bad_recipes_say_how_to_fix_them():
    with pytest.raises(
        UsageError,
        match="mxfp4 uses blocks of 32 by its spec; fix: drop --group-size or pass --group-size 32",
    ):
        QuantRecipe("mxfp4", group_size=64)
    with pytest.raises(UsageError, match="'fp6_e3m2' is a lowbit number format but not a quant"):
        QuantRecipe("fp6_e3m2")
    with pytest.raises(UsageError, match="'int3' is not a quantization target; fix: use --to int8"):
        QuantRecipe("int3")
    with pytest.raises(UsageError, match="must be positive"):
        QuantRecipe("int4", group_size=0)
    recipe = QuantRecipe("int4", group_size=48)
    sizes = {"layers.0.q_proj": 96, "layers.0.mlp.down_proj": 344, "layers.1.mlp.down_proj": 344}
    # the suggestion divides every layer's in-features (those of the first failing layer alone,
    # 2, 4, 8, 43, 86, 172, failed on the next): gcd(96, 344) = 8
    with pytest.raises(
        UsageError,
        match=r"--group-size 48 does not divide the 344 in-features of layers.0.mlp.down_proj "
        r"\(and 1 more layers\); fix: use a group size that divides every layer's \(2, 4, 8\)",
    ):
        check_divides(recipe, sizes)
    check_divides(recipe, {"layers.0.q_proj": 96})
    check_divides(QuantRecipe("int4", group_size=48, pad_groups=True), sizes)
    check_divides(QuantRecipe("int4"), sizes)  # the default group pads its last group
