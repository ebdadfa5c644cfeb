"""The low-precision layers: GEMM exactness, SQNR floors, conversion, torchao agreement."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision, convert, get_recipe
from lowbit.formats import quantize
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitConv2d, LowbitLinear, emulated_gemm, exact_accumulation
from lowbit.recipes import LayerSpec, OperandSpec, uniform_layer

FP8_RECIPES = ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise"]


def run_layer(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    layer.weight.grad = None
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad.detach(), layer.weight.grad.detach().clone()


def reference_and_lowbit(recipe, x, out_features=256, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[-1], out_features)
    grad = torch.randn(*x.shape[:-1], out_features)
    reference = run_layer(linear, x, grad)
    lowbit = run_layer(LowbitLinear(copy.deepcopy(linear), get_recipe(recipe).layer), x, grad)
    return reference, lowbit


def real_activations():
    """Hidden states of a tiny Llama on stdlib source bytes: real, non-Gaussian activations."""
    from lowbit.models import build_causal_lm

    model = build_causal_lm("tiny", 257, seed=0)
    text = torch.frombuffer(bytearray(F.__doc__.encode()[:512]), dtype=torch.uint8).long()
    with torch.no_grad():
        hidden = model.model(text[None, :256]).last_hidden_state
    return hidden[0]


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_sqnr_floors_on_random_and_real_activations(recipe):
    # torchao's float8 tests use 25 / 18 / 17 dB for output / grad_input / grad_weight.
    for x in (torch.randn(256, 128), real_activations()):
        (out, gx, gw), (out_lp, gx_lp, gw_lp) = reference_and_lowbit(recipe, x)
        assert sqnr(out, out_lp) >= 25
        assert sqnr(gx, gx_lp) >= 18
        assert sqnr(gw, gw_lp) >= 17


def test_int8_and_fp16_sqnr_floors():
    x = torch.randn(256, 128)
    (out, gx, gw), (out_lp, gx_lp, gw_lp) = reference_and_lowbit("int8", x)
    assert sqnr(out, out_lp) >= 35  # int8 row-wise: ~42 dB measured
    assert sqnr(gx, gx_lp) >= 40 and sqnr(gw, gw_lp) >= 40  # bf16 backward
    (out, gx, gw), (out_lp, gx_lp, gw_lp) = reference_and_lowbit("fp16-mixed", x)
    assert min(sqnr(out, out_lp), sqnr(gx, gx_lp), sqnr(gw, gw_lp)) >= 60


@pytest.mark.parametrize("observed", [False, True])
def test_int8_backward_gemms_are_plain_bf16_gemms(observed):
    # int8's gradients come from bf16 GEMMs of the bf16-rounded operands, as plain PyTorch
    # computes them; the same bits whether or not an observer asks for the quantized operands
    # (with one, they go through QTensors instead of the direct casts).
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64, bias=False)
    layer = LowbitLinear(linear, get_recipe("int8").layer)
    if observed:
        layer.lowbit_state.observer = lambda *args: None
    x, grad = torch.randn(32, 96), torch.randn(32, 64)
    _, gx, gw = run_layer(layer, x, grad)
    bf16 = torch.bfloat16
    assert torch.equal(gx, (grad.to(bf16) @ linear.weight.to(bf16)).float())
    assert torch.equal(gw, (grad.t().to(bf16) @ x.to(bf16)).float())


def test_rowwise_beats_tensorwise_on_outlier_rows():
    x = torch.randn(256, 128)
    x[::32] *= 1e5  # a few tokens with huge activations
    (out, _, _), (tensorwise, _, _) = reference_and_lowbit("fp8-tensorwise", x)
    (_, _, _), (rowwise, _, _) = reference_and_lowbit("fp8-rowwise", x)
    # The ordinary tokens: a per-tensor scale set by the outliers pushes them toward underflow.
    ordinary = torch.ones(256, dtype=torch.bool)
    ordinary[::32] = False
    assert sqnr(out[ordinary], rowwise[ordinary]) > sqnr(out[ordinary], tensorwise[ordinary]) + 3


@pytest.mark.parametrize(
    ("fmt", "granularity", "block", "rule"),
    [
        ("fp8_e4m3", "tensor", None, None),
        ("fp8_e5m2", "axis", None, None),
        ("fp8_e4m3", "block", 32, None),
        ("fp8_e4m3", "mx", None, None),
        ("fp4_e2m1", "mx", None, None),
        ("fp4_e2m1", "nvfp4", None, None),
        ("int8", "axis", None, None),
        ("fp8_e4m3", "axis", None, "pow2"),
    ],
)
def test_emulated_gemm_equals_float64_gemm_of_dequantized_operands(fmt, granularity, block, rule):
    a = torch.randn(64, 96) * torch.exp(torch.randn(64, 1))
    b = torch.randn(48, 96)
    qa = quantize(a, fmt, granularity, block_size=block, scale_rule=rule)
    qb = quantize(b, fmt, granularity, block_size=block, scale_rule=rule)
    reference = qa.dequantize().double() @ qb.dequantize().double().t()
    with exact_accumulation():
        exact = emulated_gemm(qa, qb).double()
    scale = reference.abs().max()
    assert ((exact - reference).abs() <= 1e-5 * scale).all()  # fp32 accumulation order only
    # Fast path: bf16 outputs (of each K-block partial for fp32 block scales), so the error is
    # bounded by 2**-8 of the sum of absolute products, the usual GEMM rounding bound.
    fast = emulated_gemm(qa, qb).double()
    bound = qa.dequantize().double().abs() @ qb.dequantize().double().abs().t()
    assert ((fast - reference).abs() <= 2**-8 * bound).all()


@pytest.mark.parametrize(
    ("fmt", "granularity", "rule"),
    [("fp8_e4m3", "tensor", None), ("fp4_e2m1", "nvfp4", None), ("fp8_e4m3", "axis", "pow2")],
)
def test_bf16_output_scales_the_accumulator_before_its_one_rounding(fmt, granularity, rule):
    # One scale left for the whole output (tensorwise; NVFP4's tensor scales after folding;
    # fp8-rowwise's power-of-two row scales, folded into the operands): the bf16 result is the
    # exact product rounded once, not the bf16 accumulator scaled and rounded again (which is off
    # by one bf16 ulp in about a third of the entries).
    torch.manual_seed(0)
    a = torch.randn(256, 128) * 3.7 * torch.exp(torch.randn(256, 1))
    b = torch.randn(96, 128) * 0.011
    qa, qb = (quantize(t, fmt, granularity, scale_rule=rule) for t in (a, b))
    exact = qa.dequantize().double() @ qb.dequantize().double().t()
    reference = exact.to(torch.bfloat16)
    out = emulated_gemm(qa, qb, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # Entries the fp32 sums cannot move by a quarter of a bf16 ulp (not cancelled to near zero).
    bound = qa.dequantize().double().abs() @ qb.dequantize().double().abs().t()
    stable = bound * 128 * 2**-24 < exact.abs() * 2**-10
    assert stable.float().mean() > 0.9
    ulps = (out.view(torch.int16).int() - reference.view(torch.int16).int()).abs()[stable]
    assert ulps.max() <= 1  # only where fp32 accumulation order lands next to a rounding boundary
    assert (ulps == 0).float().mean() > 0.995


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_block_scaled_gemm_gives_the_same_bits_in_chunks_of_k_blocks(monkeypatch, transposed):
    import lowbit.nn.gemm as gemm

    a, b = torch.randn(40, 1000), torch.randn(24, 1000)  # 8 K blocks, the last one 104 wide
    if transposed:  # the weight gradient's operands: column-major values (8 whole K blocks)
        a, b = torch.randn(1024, 40).t(), torch.randn(1024, 24).t()
    qa, qb = (quantize(t, "fp8_e4m3", "block", block_size=128) for t in (a, b))
    assert (qa.values.stride(0) == 1) == transposed  # the kernel keeps a transposed layout
    whole = emulated_gemm(qa, qb)  # one batched GEMM of the 8 blocks
    reference = qa.dequantize().double() @ qb.dequantize().double().t()
    bound = qa.dequantize().double().abs() @ qb.dequantize().double().abs().t()
    assert ((whole.double() - reference).abs() <= 2**-8 * bound).all()  # bf16 partials
    monkeypatch.setattr(gemm, "_PARTIALS_BYTES", 3 * 40 * 24 * 4)  # 3 blocks per batched GEMM
    assert torch.equal(emulated_gemm(qa, qb), whole)
    monkeypatch.setattr(gemm, "_FEW_K_BLOCKS", 8)  # a GEMM per block instead
    assert ((emulated_gemm(qa, qb).double() - reference).abs() <= 2**-8 * bound).all()


@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 64, 32), (16, 9, 16), (40, 32, 257), (5, 3, 7), (33, 1, 5), (1, 1, 2)]
)
def test_int_mm_pads_to_the_cuda_kernels_shapes_without_changing_the_sums(m, k, n):
    from lowbit.nn.gemm import int_mm

    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator).t()
    exact = a.long() @ b.long()
    padded = int_mm(a, b, pad=True)  # what a CUDA device gets; the CPU kernel takes both
    assert padded.dtype == torch.int32 and padded.shape == (m, n)
    assert torch.equal(padded.long(), exact)
    assert torch.equal(int_mm(a, b, pad=False).long(), exact)


def test_int8_layer_with_one_input_feature_computes_its_products():
    """K = 1: PyTorch's CPU int8 GEMM gets this wrong unpadded (`int_mm` pads it)."""
    linear = torch.nn.Linear(1, 6)
    layer = LowbitLinear(copy.deepcopy(linear), get_recipe("int8").layer)
    x = torch.randn(9, 1)
    assert sqnr(linear(x), layer(x)) > 35


def test_fp32_operands_are_plain_linear():
    linear = torch.nn.Linear(32, 16)
    layer = LowbitLinear(copy.deepcopy(linear), LayerSpec())
    x = torch.randn(5, 7, 32)
    assert torch.equal(layer(x), linear(x))


def test_fp32_operands_stay_fp32_under_autocast():
    """An all-fp32 spec means fp32 GEMMs also where autocast would run the layer in bf16."""
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(32, 16), torch.nn.Conv2d(3, 8, 3, padding=1)
    layers = (
        LowbitLinear(copy.deepcopy(linear), LayerSpec()),
        LowbitConv2d(copy.deepcopy(conv), LayerSpec()),
    )
    for layer, plain, x in zip(
        layers, (linear, conv), (torch.randn(5, 32), torch.randn(2, 3, 6, 6)), strict=True
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x.bfloat16())
        assert out.dtype == torch.float32
        assert torch.equal(out, plain(x.bfloat16().float()))


def test_conv_matches_conv2d_and_quantizes():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
    x = torch.randn(4, 3, 9, 9)
    bf16 = LowbitConv2d(copy.deepcopy(conv), uniform_layer(OperandSpec("bf16")))
    with exact_accumulation():
        out = bf16(x)
    reference = F.conv2d(x.bfloat16().float(), conv.weight.bfloat16().float(), conv.bias, 2, 1)
    assert torch.allclose(out, reference, atol=1e-5)
    grad = torch.randn_like(reference)
    ref = run_layer(conv, x, grad)
    low = run_layer(LowbitConv2d(copy.deepcopy(conv), get_recipe("fp8-tensorwise").layer), x, grad)
    assert sqnr(ref[0], low[0]) > 25 and sqnr(ref[1], low[1]) > 18 and sqnr(ref[2], low[2]) > 17


def test_convert_swaps_layers_reusing_parameters_and_reports():
    from lowbit.models import build_causal_lm

    model = build_causal_lm("tiny", 257, seed=0)
    params_before = {name: p for name, p in model.named_parameters()}
    report = convert(model, "fp8-tensorwise")
    assert "lm_head" in report.kept and "output head" in report.kept["lm_head"]
    assert len(report.converted) > 0
    assert report.summary().startswith(f"converted {len(report.converted)}/")
    for name, p in model.named_parameters():
        assert p is params_before[name]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LowbitLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(
        model.lm_head, LowbitLinear
    )


def test_converting_twice_is_harmless_with_one_recipe_and_refused_with_another():
    from lowbit.errors import UsageError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    convert(model, "fp8-tensorwise")
    layer = model[0]
    again = convert(model, "fp8-tensorwise")
    assert model[0] is layer and list(again.converted) == ["0", "1"]
    with pytest.raises(UsageError, match=r"0 is converted already .*unconverted model"):
        convert(model, "int8")
    with pytest.raises(UsageError, match="no parent"):  # a bare layer cannot be swapped in place
        convert(torch.nn.Linear(8, 8), "fp8-tensorwise")
    bare = torch.nn.Linear(8, 8)  # Precision.convert returns the model: here, its replacement
    converted = Precision("fp8-tensorwise").convert(bare)
    assert isinstance(converted, LowbitLinear) and converted.weight is bare.weight


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-delayed", "int8", "mxfp4", "nvfp4"])
def test_an_empty_batch_gives_an_empty_output_and_gradient(recipe):
    linear = torch.nn.Linear(16, 8)
    layer = LowbitLinear(copy.deepcopy(linear), get_recipe(recipe).layer)
    x = torch.randn(0, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = linear(x)
    assert out.shape == (0, 5, 8) and out.dtype == expected.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(layer.weight.grad, torch.zeros(8, 16))


def test_conv_takes_unbatched_images_and_valid_padding():
    conv = torch.nn.Conv2d(3, 8, 3, padding="valid")
    model = torch.nn.Sequential(copy.deepcopy(conv))
    assert list(convert(model, "fp8-tensorwise").converted) == ["0"]
    image = torch.randn(3, 9, 9)
    out = model(image)
    assert out.shape == conv(image).shape == (8, 7, 7)
    assert torch.equal(out, model(image[None])[0])
    assert sqnr(conv(image), out) > 25


def test_an_override_that_decides_no_layer_is_reported():
    from lowbit.models import build_causal_lm
    from lowbit.recipes import parse_override

    recipe = get_recipe("fp8-tensorwise")
    typo = parse_override("model.layerz.1.mlp.down_proj=fp32", recipe)
    used = parse_override("model.layers.0.*=keep", recipe)
    report = convert(build_causal_lm("nano", 257, seed=0), recipe.with_overrides(typo, used))
    assert report.unused_overrides == ["model.layerz.1.mlp.down_proj=fp32"]
    assert "model.layerz.1.mlp.down_proj=fp32 applies to no layer" in report.summary()


def test_grouped_convolution_is_converted():
    """Kept until session 40 ("grouped convolution (groups > 1) is not converted");
    tests/nn/test_grouped_conv_s40.py checks its GEMMs."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Conv2d(4, 2, 1))
    report = convert(model, "fp8-tensorwise")
    assert report.kept == {}
    assert list(report.converted) == ["0", "1"]


def _torchao_float8(recipe_name):
    float8 = pytest.importorskip("torchao.float8")
    if recipe_name is None:
        return float8.Float8LinearConfig(emulate=True)
    config = float8.Float8LinearConfig.from_recipe_name(recipe_name)
    return float8.Float8LinearConfig(**{**config.__dict__, "emulate": True})


@pytest.mark.parametrize(
    ("recipe", "torchao_recipe"), [("fp8-tensorwise", None), ("fp8-rowwise", "rowwise")]
)
def test_agrees_with_torchao_float8_emulation(recipe, torchao_recipe):
    from torchao.float8 import convert_to_float8_training

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False))
    peer = convert_to_float8_training(copy.deepcopy(model), config=_torchao_float8(torchao_recipe))
    x, grad = torch.randn(128, 256), torch.randn(128, 512)
    xt = x.clone().requires_grad_()
    out_t = peer(xt)
    out_t.backward(grad)
    theirs = (out_t.detach(), xt.grad, peer[0].weight.grad)
    with exact_accumulation():
        ours = run_layer(LowbitLinear(copy.deepcopy(model[0]), get_recipe(recipe).layer), x, grad)
    # Same quantized operands; only the accumulation order differs (measured: > 100 dB).
    for mine, peer_value in zip(ours, theirs):
        assert sqnr(peer_value, mine) > 60
