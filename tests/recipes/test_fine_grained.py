"""Fine-grained presets (fp8-blockwise, MX, NVFP4): operands bit-exact with an independent
reference quantizer, GEMMs equal to float64 GEMMs of the dequantized operands, SQNR floors,
Hadamard and stochastic-rounding effects, torchao agreement, first/last-block overrides, training.
"""

import math
import re
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision, convert, get_recipe
from lowbit.formats import Granularity, Rounding, ScaleRule, cast_reference, get
from lowbit.formats.error import sqnr
from lowbit.formats.hadamard import random_signs, transform
from lowbit.nn import LowbitLinear, exact_accumulation
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import GemmSpec, LayerSpec, OperandSpec, Override, Recipe, Transform
from lowbit.recipes.recipe import FIRST_BLOCK, LAST_BLOCK
from tests.once import once_per_session

PRESETS = ["fp8-blockwise", "mxfp8", "mxfp6", "mxfp8-rceil", "mxfp6-rceil", "mxfp4", "nvfp4"]
SEED = 11  # the LowbitLinear seed: its random Hadamard signs

# OCP MX v1.0 table: exponent of the largest binade of each element format (emax_elem).
EMAX_ELEM = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2}
ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


# --- an independent reference quantizer -----------------------------------------------------------


def pow2_f32(exponent: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent).float()


def reference_block(spec: OperandSpec) -> tuple[int, int]:
    g, size = spec.granularity, spec.block_size
    if g is Granularity.MX:
        return 1, 32
    if g is Granularity.NVFP4:
        return tuple(size) if isinstance(size, tuple) else (1, 16)
    if g is Granularity.BLOCK:
        return 1, size
    assert g is Granularity.BLOCK2D
    return tuple(size)


def reference_scales(amax: torch.Tensor, tensor_amax, spec: OperandSpec):
    """fp32 block scales (and NVFP4 tensor scale) from the formulas of the papers/specs."""
    fmt = get(spec.format)
    if spec.granularity is Granularity.NVFP4:  # NVIDIA 2025: s_t = amax / (6 * 448), fp32 math
        s_t = (tensor_amax.double() / (6 * 448)).float()
        s_b = cast_reference((amax / 6.0) / s_t, "fp8_e4m3")
        return s_b, s_t
    rule = spec.scale_rule or (
        ScaleRule.MX_FLOOR if spec.granularity is Granularity.MX else ScaleRule.AMAX
    )
    a64 = amax.double()
    if rule is ScaleRule.AMAX:  # DeepSeek-V3: s = amax / 448, the block max lands on 448
        return torch.where(amax > 0, (a64 / fmt.max).float(), 1.0), None
    if rule is ScaleRule.MX_FLOOR:  # OCP MX §6.3: 2**(floor(log2 amax) - emax_elem)
        _, e = torch.frexp(a64)
        exponent = torch.where(amax > 0, e - 1 - EMAX_ELEM[spec.format], -127)
        return pow2_f32(exponent.clamp(-127, 127)), None
    assert rule is ScaleRule.MX_CEIL  # smallest power of two with amax / s <= max
    exponent = torch.ceil(torch.log2(a64 / fmt.max)).long()
    exponent = exponent + (a64 > fmt.max * torch.ldexp(torch.ones_like(a64), exponent)).long()
    lower = exponent - 1
    exponent = torch.where(
        a64 <= fmt.max * torch.ldexp(torch.ones_like(a64), lower), lower, exponent
    )
    exponent = torch.where(amax > 0, exponent, 0)
    return pow2_f32(exponent.clamp(-127, 127)), None


def reference_quantize(x: torch.Tensor, spec: OperandSpec):
    """(values, block-scale grid, tensor scale, per-element divisor) of a 2-D operand along its
    last axis; SR operands are returned with nearest values (see `neighbours`)."""
    x = x.float()
    if spec.is_plain_cast:
        values = cast_reference(x, spec.format)
        return values, None, None, torch.ones_like(x)
    rows, cols = x.shape
    br, bc = reference_block(spec)
    padded = F.pad(x, (0, (-cols) % bc, 0, (-rows) % br))
    blocks = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    amax = blocks.abs().amax(dim=(1, 3))
    scale, tensor_scale = reference_scales(amax, x.abs().max(), spec)
    effective = scale * tensor_scale if tensor_scale is not None else scale
    divisor = effective.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    safe = torch.where(divisor > 0, divisor, 1.0)
    values = cast_reference(x / safe, spec.format)
    values = torch.where(divisor > 0, values, 0.0)
    return values, scale, tensor_scale, divisor


def grid(fmt: str) -> torch.Tensor:
    codes = np.arange(2 ** get(fmt).bits, dtype=np.uint8 if get(fmt).bits <= 8 else np.uint16)
    values = codes.view(ML_DTYPES[fmt]).astype(np.float64)
    return torch.tensor(np.unique(values[np.isfinite(values)]))


def neighbours(scaled: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values just below and just above each (saturated) element."""
    g = grid(fmt)
    v = scaled.double().clamp(g[0], g[-1]).flatten()
    upper = torch.searchsorted(g, v, side="left")
    lower = torch.searchsorted(g, v, side="right") - 1
    return g[lower].reshape(scaled.shape), g[upper.clamp(max=len(g) - 1)].reshape(scaled.shape)


def gemm_operands(gemm: GemmSpec, a: torch.Tensor, b: torch.Tensor):
    """The two operands as the GEMM quantizes them: Hadamard-transformed (K zero-padded to
    whole blocks) when the GEMM asks for it, with the layer's seeded random signs."""
    if gemm.transform is Transform.HADAMARD:
        signs = random_signs(gemm.transform_block, SEED)
        a, b = transform(a, signs), transform(b, signs)
    return a, b


def reference_gemm(gemm: GemmSpec, a: torch.Tensor, b: torch.Tensor):
    """float64 ``deq(a) @ deq(b).T`` and ``|deq(a)| @ |deq(b)|.T`` (the bound on rounding)."""
    a, b = gemm_operands(gemm, a, b)
    deq = []
    for operand, spec in ((a, gemm.a), (b, gemm.b)):
        values, _, _, divisor = reference_quantize(operand, spec)
        deq.append(values.double() * divisor.double())
    return deq[0] @ deq[1].t(), deq[0].abs() @ deq[1].abs().t()


def nearest(layer: LayerSpec) -> LayerSpec:
    """The layer with every stochastic rounding replaced by nearest (deterministic)."""

    def fix(g: GemmSpec) -> GemmSpec:
        return replace(
            g,
            a=replace(g.a, rounding=Rounding.NEAREST),
            b=replace(g.b, rounding=Rounding.NEAREST),
        )

    return LayerSpec(fix(layer.forward), fix(layer.grad_input), fix(layer.grad_weight))


def layer_operands(x, w, g) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """GEMM name -> (a, b) of ``a @ b.T``, each contracted along its last axis."""
    return {
        "forward": (x, w),
        "grad_input": (g, w.t()),
        "grad_weight": (g.t(), x.t()),
    }


def run(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    layer.weight.grad = None
    out = layer(x)
    out.backward(g)
    return out.detach(), x.grad.detach(), layer.weight.grad.detach().clone()


def data(m=256, k=128, n=344, seed=0):
    """Activations with varying token scales, a Linear's weight, and an output gradient.
    n = 344 is the tiny model's intermediate size: not a multiple of 32, 64 or 128."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    w = (torch.rand(n, k, generator=gen) * 2 - 1) / math.sqrt(k)
    g = torch.randn(m, n, generator=gen) * 1e-3
    return x, w, g


def lowbit_layer(w: torch.Tensor, spec: LayerSpec) -> LowbitLinear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return LowbitLinear(linear, spec, seed=SEED)


# --- the presets as data ------------------------------------------------------------------------


def test_preset_operands_are_the_published_recipes():
    blockwise = get_recipe("fp8-blockwise").layer
    tile = (Granularity.BLOCK, 128)
    for gemm, a, b in [
        (blockwise.forward, tile, (Granularity.BLOCK2D, (128, 128))),
        (blockwise.grad_input, tile, (Granularity.BLOCK2D, (128, 128))),
        (blockwise.grad_weight, tile, tile),
    ]:
        assert (gemm.a.format, gemm.b.format) == ("fp8_e4m3", "fp8_e4m3")
        assert (gemm.a.granularity, gemm.a.block_size) == a
        assert (gemm.b.granularity, gemm.b.block_size) == b
    formats = {
        "mxfp8": ("fp8_e4m3", "fp8_e4m3"),
        "mxfp6": ("fp6_e2m3", "fp6_e3m2"),
    }
    for name, (weight_act, grad) in formats.items():
        for suffix, rule in (("", ScaleRule.MX_FLOOR), ("-rceil", ScaleRule.MX_CEIL)):
            ops = get_recipe(name + suffix).layer.operands()
            for op_name, spec in ops.items():
                assert spec.granularity is Granularity.MX and spec.scale_rule is rule
                assert spec.format == (grad if "grad_out" in op_name else weight_act)
    mxfp4 = get_recipe("mxfp4").layer
    assert mxfp4.forward.a.format == mxfp4.forward.b.format == "bf16"
    for gemm in (mxfp4.grad_input, mxfp4.grad_weight):
        assert gemm.transform is Transform.HADAMARD
        for spec in (gemm.a, gemm.b):
            assert (spec.format, spec.granularity) == ("fp4_e2m1", Granularity.MX)
            assert spec.rounding is Rounding.STOCHASTIC
    nvfp4 = get_recipe("nvfp4").layer
    assert nvfp4.forward.b.block_size == nvfp4.grad_input.b.block_size == (16, 16)
    assert nvfp4.grad_weight.transform is Transform.HADAMARD
    assert nvfp4.grad_weight.transform_block == 16
    assert nvfp4.forward.transform is nvfp4.grad_input.transform is Transform.NONE
    for name, spec in nvfp4.operands().items():
        assert spec.granularity is Granularity.NVFP4
        sr = spec.rounding is Rounding.STOCHASTIC
        assert sr == ("grad_out" in name)  # SR on gradients only


# --- operands bit-exact with the reference quantizer --------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_operands_are_bit_exact_with_the_reference_quantizer(preset):
    layer = get_recipe(preset).layer
    x, w, g = data(m=160)  # 160 tokens: not a multiple of 128 either
    for gemm_name, (a, b) in layer_operands(x, w, g).items():
        gemm = getattr(layer, gemm_name)
        a, b = gemm_operands(gemm, a, b)
        for operand, spec in ((a, gemm.a), (b, gemm.b)):
            torch.manual_seed(0)
            q = quantize_operand(operand, spec)
            values, scale, tensor_scale, divisor = reference_quantize(operand, spec)
            if spec.is_plain_cast:
                assert torch.equal(q.values.float(), values)
                continue
            assert torch.equal(q.scale, scale), (preset, gemm_name, spec)
            if tensor_scale is not None:
                assert torch.equal(q.tensor_scale.reshape(()), tensor_scale.reshape(()))
            if spec.rounding is Rounding.NEAREST:
                assert torch.equal(q.values.float(), values), (preset, gemm_name, spec)
            else:  # stochastic: one of the two grid neighbours of x / s, and not always nearest
                safe = torch.where(divisor > 0, divisor, 1.0)
                low, high = neighbours(operand / safe, spec.format)
                v = q.values.double()
                assert ((v == low) | (v == high)).all(), (preset, gemm_name, spec)
                assert (v != values.double()).float().mean() > 0.05


@pytest.mark.parametrize("name", ["mxfp8", "mxfp8-rceil", "mxfp6", "mxfp6-rceil"])
def test_mx_operands_match_torchao_to_mx_bit_for_bit(name):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    mode = ScaleCalculationMode.RCEIL if name.endswith("rceil") else ScaleCalculationMode.FLOOR
    torchao_dtype = {
        "fp8_e4m3": torch.float8_e4m3fn,
        "fp6_e2m3": "fp6_e2m3",
        "fp6_e3m2": "fp6_e3m2",
    }
    gen = torch.Generator().manual_seed(3)
    x = torch.distributions.StudentT(3.0).sample((96, 128)) * 0.1
    w = torch.randn(64, 128, generator=gen) * 0.05
    g = torch.randn(96, 64, generator=gen) * 1e-4
    if mode == ScaleCalculationMode.FLOOR:
        x[0, :32] = 0  # an all-zero block: e8m0 code 0 (2**-127) in both
    layer = get_recipe(name).layer
    for gemm_name, (a, b) in layer_operands(x, w, g).items():
        gemm = getattr(layer, gemm_name)
        for operand, spec in ((a, gemm.a), (b, gemm.b)):
            q = quantize_operand(operand, spec)
            scale, data_lp = mx.to_mx(operand.contiguous(), torchao_dtype[spec.format], 32, mode)
            assert torch.equal(q.scale, scale.float().reshape(q.scale.shape)), (gemm_name, spec)
            if spec.format.startswith("fp6"):  # unpacked 6-bit codes: decode with ml_dtypes
                codes = data_lp.view(torch.uint8).numpy()
                data_lp = torch.from_numpy(codes.view(ML_DTYPES[spec.format]).astype(np.float32))
            assert torch.equal(q.values.float(), data_lp.float()), (gemm_name, spec)


# --- GEMMs equal a float64 GEMM of the dequantized operands -------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_gemms_equal_float64_gemms_of_dequantized_operands(preset):
    spec = nearest(get_recipe(preset).layer)  # deterministic: SR is tested on its own below
    x, w, g = data()
    layer = lowbit_layer(w, spec)
    with exact_accumulation():
        exact = run(layer, x, g)
    fast = run(layer, x, g)  # default path: bf16 GEMM outputs (or bf16 per-K-block partials)
    for gemm_name, got_exact, got_fast in zip(
        ("forward", "grad_input", "grad_weight"), exact, fast
    ):
        a, b = layer_operands(x, w, g)[gemm_name]
        reference, magnitude = reference_gemm(getattr(spec, gemm_name), a, b)
        if gemm_name == "grad_weight":
            got_exact, got_fast = got_exact.t(), got_fast.t()  # grad_w = (grad_out.T @ x)
            reference, magnitude = reference.t(), magnitude.t()
        scale = reference.abs().max()
        # fp32 accumulation: only the order of the sums differs from float64.
        assert ((got_exact.double() - reference).abs() <= 1e-5 * scale).all(), gemm_name
        # bf16 outputs: each (partial) product rounded once, relative 2**-9.
        bound = 2**-8 * magnitude + 1e-6 * scale
        assert ((got_fast.double() - reference).abs() <= bound).all(), gemm_name


# --- SQNR floors vs fp32 ------------------------------------------------------------------------

# preset -> SQNR floors (dB) of (output, grad_input, grad_weight) vs fp32, 1-1.5 dB under the
# values measured on this data (fp8-blockwise 28.9/28.8/29.4, mxfp8 27.7/27.9/26.7 -- the OCP
# floor scale saturates block maxima, the round-up scale 28.5/28.4/28.5 does not --, mxfp6
# 28.2/24.4/23.7, mxfp4 50.9/12.8/12.7, nvfp4 16.9/15.0/15.3). torchao's MX tests ask ~13 dB of
# fp4 with nearest rounding; stochastic rounding doubles the error power (q**2/6 against q**2/12
# for a uniform position in the gap), so mxfp4's SR gradients sit ~3 dB lower by design: it buys
# unbiasedness (tested below), not a smaller error.
SQNR_FLOORS = {
    "fp8-blockwise": (27.5, 27.5, 28),
    "mxfp8": (26.5, 26.5, 25),
    "mxfp8-rceil": (27, 27, 27),
    "mxfp6": (27, 23, 22),
    "mxfp6-rceil": (27, 23, 22),
    "mxfp4": (45, 11.5, 11.5),
    "nvfp4": (15.5, 14, 14),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_sqnr_floors_vs_fp32(preset):
    x, w, g = data()
    reference = run(lowbit_layer(w, LayerSpec()), x, g)
    torch.manual_seed(0)
    low = run(lowbit_layer(w, get_recipe(preset).layer), x, g)
    measured = [sqnr(r, lp) for r, lp in zip(reference, low)]
    floors = SQNR_FLOORS[preset]
    assert all(m >= f for m, f in zip(measured, floors)), (preset, measured)


def test_fp4_gradients_with_nearest_rounding_meet_torchaos_13_db():
    # torchao's MX tests ask ~13 dB of fp4 (nearest rounding). The mxfp4 preset's gradients use
    # stochastic rounding, which costs ~3 dB by design (floors above); the same preset with nearest
    # rounding in the backward clears 13 dB, so the gap is the rounding mode, not the format.
    x, w, g = data()
    reference = run(lowbit_layer(w, LayerSpec()), x, g)
    for preset in ("mxfp4", "nvfp4"):
        spec = get_recipe(preset).layer

        def nearest(gemm):
            return replace(
                gemm,
                a=replace(gemm.a, rounding=Rounding.NEAREST),
                b=replace(gemm.b, rounding=Rounding.NEAREST),
            )

        spec = replace(
            spec, grad_input=nearest(spec.grad_input), grad_weight=nearest(spec.grad_weight)
        )
        low = run(lowbit_layer(w, spec), x, g)
        measured = [sqnr(r, lp) for r, lp in zip(reference, low)]
        assert all(m >= 13 for m in measured), (preset, measured)  # measured 15.8 / 16.7 dB


def outlier_data(seed=0):
    """Real-looking trouble: a few tokens with huge activations and a few output channels with
    huge gradients, so MX/NVFP4 blocks along tokens and channels hold one outlier each."""
    x, w, g = data(m=256, k=128, n=256, seed=seed)
    x[::29] *= 50.0
    g[:, ::23] *= 50.0
    g[::31] *= 20.0
    return x, w, g


def test_hadamard_raises_mxfp4_gradient_sqnr_on_outliers():
    # Without the transform an outlier token or channel sets the e8m0 scale of its 32-block, and
    # stochastic rounding of the block's other values has a variance set by that scale (Tseng et
    # al. 2025, §4). Measured gains: `benchmarks/hadamard_sqnr.py` (docs/recipes-fine-grained.md).
    # (NVFP4's RHT is not tested this way: with e4m3 block scales the block maximum is nearly
    # exact, and on outlier data the 16x16 RHT lowers single-GEMM SQNR; the same script says how
    # much.)
    layer = get_recipe("mxfp4").layer
    without = LayerSpec(
        layer.forward,
        replace(layer.grad_input, transform=Transform.NONE),
        replace(layer.grad_weight, transform=Transform.NONE),
    )
    gains = {1: [], 2: []}
    for seed in range(3):
        x, w, g = outlier_data(seed)
        reference = run(lowbit_layer(w, LayerSpec()), x, g)
        torch.manual_seed(seed)
        with_rht = run(lowbit_layer(w, layer), x, g)
        torch.manual_seed(seed)
        without_rht = run(lowbit_layer(w, without), x, g)
        for i in gains:
            gains[i].append(sqnr(reference[i], with_rht[i]) - sqnr(reference[i], without_rht[i]))
    mean = {i: sum(v) / len(v) for i, v in gains.items()}
    assert mean[1] >= 1.0 and mean[2] >= 3.0, gains


# --- stochastic rounding makes fp4 gradients unbiased ---------------------------------------------


def test_mxfp4_stochastic_rounding_gives_unbiased_gradients_and_nearest_does_not():
    spec = get_recipe("mxfp4").layer
    x, w, g = data(m=128, k=64, n=32, seed=5)
    g = g * torch.exp(torch.randn(1, 32, generator=torch.Generator().manual_seed(6)))
    exact_gx, exact_gw = (g.double() @ w.double()), (g.double().t() @ x.double())
    draws = 160
    sr_layer = lowbit_layer(w, spec)
    samples_gx, samples_gw = [], []
    torch.manual_seed(0)
    with exact_accumulation():
        for _ in range(draws):
            _, gx, gw = run(sr_layer, x, g)
            samples_gx.append(gx.double())
            samples_gw.append(gw.double())
        _, gx_nearest, gw_nearest = run(lowbit_layer(w, nearest(spec)), x, g)
    for samples, exact, single_nearest in (
        (samples_gx, exact_gx, gx_nearest),
        (samples_gw, exact_gw, gw_nearest),
    ):
        stacked = torch.stack(samples)
        mean, std = stacked.mean(0), stacked.std(0)
        # Unbiased: the standardized errors of the means have mean square ~1 (t-statistics with
        # 159 degrees of freedom over >= 2048 elements: 1 +- 0.05); a bias of even a tenth of the
        # per-draw noise would push it past 1 + 0.1**2 * draws = 2.6.
        t = (mean - exact) / (std / math.sqrt(draws))
        assert 0.8 < t.pow(2).mean().item() < 1.25
        # Nearest rounding is deterministic and biased: its error does not average away.
        error_sr = (mean - exact).norm() / exact.norm()
        error_nearest = (single_nearest.double() - exact).norm() / exact.norm()
        assert error_nearest > 0.02
        assert error_sr < 0.25 * error_nearest


def test_nvfp4_gradients_are_stochastic_and_forward_is_deterministic():
    x, w, g = data(m=64, k=128, n=64)
    layer = lowbit_layer(w, get_recipe("nvfp4").layer)
    torch.manual_seed(1)
    first = run(layer, x, g)
    torch.manual_seed(2)
    second = run(layer, x, g)
    torch.manual_seed(1)
    again = run(layer, x, g)
    assert torch.equal(first[0], second[0])  # forward: nearest rounding
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[2], second[2])
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible for a seed


# --- first and last blocks ----------------------------------------------------------------------


def test_override_last_placeholder_resolves_to_the_highest_block_index():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(12)] + ["lm_head", "model.layers"]
    override = Override("*.layers.{last}.*")
    assert override.resolve(names).pattern == "*.layers.11.*"  # numeric, not lexicographic
    assert override.resolve(["lm_head"]) == override  # no numbered container: unchanged
    assert not override.matches("model.layers.11.mlp.down_proj")  # unresolved: matches nothing
    assert Override("lm_head").resolve(names) == Override("lm_head")
    recipe = Recipe("r", "", overrides=(override,))
    resolved = recipe.resolved_for(names)
    assert resolved.layer_for("model.layers.11.mlp.down_proj")[0] is None
    assert resolved.layer_for("model.layers.1.mlp.down_proj")[1] == "the recipe converts no layers"


@pytest.mark.parametrize("layers", [2, 4, 11])
def test_nvfp4_keeps_the_first_and_last_blocks_of_any_depth(layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    report = convert(model, "nvfp4")
    kept_blocks = {int(name.split(".")[2]) for name in report.kept if name.startswith("model.")}
    converted_blocks = {int(name.split(".")[2]) for name in report.converted}
    assert kept_blocks == {0, layers - 1}
    assert converted_blocks == set(range(1, layers - 1))
    assert "lm_head" in report.kept
    assert len(report.converted) == 7 * (layers - 2)  # q, k, v, o, gate, up, down
    assert isinstance(model.model.layers[layers - 1].mlp.down_proj, torch.nn.Linear)
    assert not isinstance(model.model.layers[layers - 1].mlp.down_proj, LowbitLinear)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64))


def _bert():
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    return BertForTokenClassification(config)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(num_layers=3, num_decoder_layers=4, d_model=32, d_kv=8, d_ff=64, num_heads=2)
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize(
    ("build", "first", "last"),
    [
        (_gpt2, {"transformer.h.0"}, {"transformer.h.3"}),
        (_bert, {"bert.encoder.layer.0"}, {"bert.encoder.layer.2"}),
        (_t5, {"encoder.block.0", "decoder.block.0"}, {"encoder.block.2", "decoder.block.3"}),
    ],
    ids=["gpt2", "bert", "t5"],
)
def test_nvfp4_finds_the_end_blocks_under_any_naming(build, first, last):
    model = build()
    report = convert(model, "nvfp4")

    def block(name):  # up to the first numbered component: transformer.h.0.attn.c_attn -> h.0
        return re.match(r"(.*?\.\d+)\.", name).group(1)

    kept_first = {block(n) for n, why in report.kept.items() if why.startswith("first block")}
    kept_last = {block(n) for n, why in report.kept.items() if why.startswith("last block")}
    assert kept_first == first and kept_last == last
    converted = {block(name) for name in report.converted}
    assert converted and not converted & (first | last)  # the middle blocks are NVFP4


def test_block_placeholders_need_numbered_containers_that_hold_modules():
    from lowbit.models import build_cnn

    # A Sequential of single layers (the digits CNN's features.0, features.2) has no blocks: its
    # ends are its first and last GEMM layer (the head, kept by every preset anyway).
    model = build_cnn("tiny")
    report = convert(model, "nvfp4")
    assert set(report.converted) == {"features.2"}
    assert report.kept["features.0"].startswith("first block (or layer")
    mlp = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4)))
    assert set(convert(mlp, "nvfp4").converted) == {"1", "2"}
    ends = [
        Override(end).resolve(["", "a", "b"], ["a", "b"]).pattern
        for end in (FIRST_BLOCK, LAST_BLOCK)
    ]
    assert ends == ["a", "b"]
    names = ["0.fc", "1.fc", "2", "lm_head", "stack.0.experts.7.up", "stack.1.experts.0.up"]
    last = Override(LAST_BLOCK).resolve(names)
    assert last.pattern == "1.*|stack.1.*"  # a top-level Sequential; experts are not blocks
    assert last.matches("stack.1.experts.0.up") and not last.matches("stack.0.experts.7.up")
    assert not last.matches("2")  # a numbered layer is not a block
    first = Override(FIRST_BLOCK)
    assert first.matches("stack.0.experts.7.up") and first.matches("0.fc")
    assert not first.matches("stack.1.experts.0.up") and not first.matches("features.0")
    assert Override(LAST_BLOCK).resolve(["features.0", "head"]).matches("features.0") is False


def test_a_wrapped_model_is_not_one_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    config = LlamaConfig(num_hidden_layers=3, vocab_size=64, **fields)
    model = torch.nn.Sequential(LlamaForCausalLM(config), torch.nn.Linear(64, 8))
    names = [name for name, _ in model.named_modules()]
    assert Override(FIRST_BLOCK).resolve(names).pattern == "0.model.layers.0.*"
    assert Override(LAST_BLOCK).resolve(names).pattern == "0.model.layers.2.*"
    report = convert(model, "nvfp4")
    blocks = {name.split(".")[3] for name in report.converted if name.startswith("0.model")}
    assert blocks == {"1"}  # the middle block; the new head is outside the blocks, kept
    assert report.kept["1"] == "outside the blocks (not a block's GEMM) kept in bf16 (NVFP4)"


# --- training -----------------------------------------------------------------------------------


def train_tiny_lm(preset: str, steps: int = 4) -> list[float]:
    """Losses of a few AdamW steps of the tiny Llama on one fixed batch of stdlib text bytes."""
    from lowbit.models import build_causal_lm

    text = (F.__doc__ or "") + (torch.nn.Module.__doc__ or "")
    tokens = torch.frombuffer(bytearray(text.encode()[: 4 * 65]), dtype=torch.uint8).long()
    tokens = tokens.reshape(4, 65)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    torch.manual_seed(0)
    model = build_causal_lm("tiny", 257, seed=0)
    precision = Precision(preset)
    model = precision.convert(model)
    if preset != "fp32":
        assert len(precision.conversion_report.converted) > 0
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3))
    losses = []
    for _ in range(steps):
        with precision.autocast():
            logits = model(inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    """fp32's losses, trained once per session."""
    return once_per_session(tmp_path_factory, "fine-grained-fp32", lambda: train_tiny_lm("fp32"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_the_tiny_causal_lm(preset, fp32_losses):
    losses = train_tiny_lm(preset)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0, losses  # fp32: 5.60 -> 4.06 in 4 steps
    assert abs(losses[-1] - fp32_losses[-1]) < 0.15, (losses, fp32_losses)
