"""Fine-grained scaled presets: blockwise fp8 (DeepSeek-V3), OCP MX formats, NVFP4.

Every preset below quantizes each GEMM operand along that GEMM's contraction axis (see
`lowbit.recipes.recipe` for the three GEMMs of a layer) with block scales, so one outlier only
coarsens its own block. docs/recipes-fine-grained.md tabulates them.

``fp8-blockwise`` (DeepSeek-V3 technical report §3.3, "fine-grained quantization")
    e4m3 everywhere; activations and output gradients in 1x128 tiles, weights in 128x128 blocks,
    one fp32 scale ``amax / 448`` per tile or block. The weight's 128x128 blocks serve both the
    forward (contracted over K) and the input gradient (contracted over N): the same tiles,
    transposed. The weight gradient contracts over the tokens, so its operands (``grad_out.T`` and
    ``x.T``) are tiled 1x128 along the tokens (DeepSeek's 128x1 tiles of the untransposed tensors).
    The emulated GEMM scales each 128-wide K block's partial product in fp32 and sums in fp32, as
    DeepSeek promotes partial sums to CUDA-core fp32 every 128 elements. Dimensions that are not
    multiples of 128 are zero-padded by `quantize`.

``mxfp8`` / ``mxfp6`` / ``mxfp4`` (OCP Microscaling Formats v1.0; Rouhani et al. 2023)
    32-element blocks along the contraction axis with a shared e8m0 scale chosen by the OCP rule
    ``2**(floor(log2 amax) - emax_elem)`` (``ScaleRule.MX_FLOOR``). ``mxfp8``: e4m3 for every
    operand (as torchao's MX training and NVIDIA's MXFP8 recipe, whose per-block scale gives
    gradients the range e5m2 would). ``mxfp6``: e2m3 (more mantissa) for weights and activations,
    e3m2 (more range) for output gradients, the split the OCP spec and Rouhani et al. suggest.
    ``mxfp8-rceil`` / ``mxfp6-rceil`` use the round-up scale ``2**ceil(log2(amax / max))``
    (``ScaleRule.MX_CEIL``, torchao's RCEIL), which never saturates.

    ``mxfp4`` follows Tseng et al. 2025 ("Training LLMs with MXFP4"): the backward GEMMs (input
    and weight gradient) run in MXFP4 e2m1 with stochastic rounding, so their expected value is
    the exact gradient, and a random Hadamard transform of the contraction axis (blocks of 64,
    two MX blocks) that spreads block outliers and so bounds the variance SR adds. The forward
    stays in bf16, as the paper does. Its SR operands use the round-up scale: with the floor
    scale a block's largest values can exceed 6 after scaling and saturate, which biases SR; the
    paper avoids the same clipping by quantizing ``3/4 x`` and multiplying the GEMM by ``16/9``,
    which puts the block maximum in [3, 6), as the round-up scale puts it in (3, 6].

``nvfp4`` (NVIDIA 2025, "Pretraining Large Language Models with NVFP4")
    e2m1 elements in 16-element blocks with an fp8 e4m3 block scale and an fp32 per-tensor scale.
    Weights use 16x16 2-D blocks, so the forward and the input gradient see the same quantized
    weight; output gradients use stochastic rounding (weights and activations nearest); the
    weight-gradient GEMM's inputs get a 16x16 random Hadamard transform along the tokens. The
    first and the last block stay in bf16 (the paper keeps a few blocks at both ends of the
    network in bf16, about 15% of the linear layers of its 12B model): overrides `FIRST_BLOCK` and
    `LAST_BLOCK`, which find the blocks under any naming (Llama's ``model.layers.<i>``, GPT-2's
    ``transformer.h.<i>``, BERT's ``encoder.layer.<i>``; each stack of an encoder-decoder), the
    last one resolved by `convert` for the model at hand. A model without numbered blocks (a
    Sequential of single layers, such as the digits CNN) keeps its first and last GEMM layer, the
    ends of such a network: on the digits CNN its first convolution reads the raw pixels, and
    with both convolutions in NVFP4 the recipe cost 4.1% of validation loss against fp32, 0.2% with
    the first convolution and the classifier kept (the parity study, docs/parity.md). The paper
    puts the blocks' linear layers in NVFP4 and nothing else, so the GEMM layers outside every
    block stay in bf16 too (`OUTSIDE_BLOCKS`: ELECTRA's ``embeddings_project``, ALBERT's
    ``embedding_hidden_mapping_in``, a masked-LM head's ``dense``), besides the heads every preset
    keeps.

Every preset keeps the output head in high precision (bf16 autocast) like the fp8 presets;
embeddings, norms and attention's softmax(QK^T)V are not linear layers and are never quantized.
"""

from __future__ import annotations

from lowbit.formats import Granularity, Rounding, ScaleRule
from lowbit.recipes.presets import BF16, KEEP_HIGH_PRECISION, register_preset
from lowbit.recipes.recipe import (
    FIRST_BLOCK,
    LAST_BLOCK,
    OUTSIDE_BLOCKS,
    GemmSpec,
    LayerSpec,
    OperandSpec,
    Override,
    Recipe,
    Transform,
    uniform_layer,
)

DEEPSEEK_TILE = 128  # DeepSeek-V3 §3.3: 1x128 activation tiles, 128x128 weight blocks
MXFP4_HADAMARD_BLOCK = 64  # two 32-element MX blocks per random Hadamard block
NVFP4_HADAMARD_BLOCK = 16  # NVIDIA NVFP4 recipe: 16x16 Hadamard matrices on Wgrad inputs

# --- fp8-blockwise -------------------------------------------------------------------------------

E4M3_TILE = OperandSpec("fp8_e4m3", Granularity.BLOCK, block_size=DEEPSEEK_TILE)
E4M3_WEIGHT_BLOCK = OperandSpec(
    "fp8_e4m3", Granularity.BLOCK2D, block_size=(DEEPSEEK_TILE, DEEPSEEK_TILE)
)


def blockwise_fp8_layer() -> LayerSpec:
    """DeepSeek-V3's three GEMMs: 1x128 tiles on activations and gradients, 128x128 on weights."""
    return LayerSpec(
        forward=GemmSpec(E4M3_TILE, E4M3_WEIGHT_BLOCK),  # x (1x128 along K) @ w (128x128)
        grad_input=GemmSpec(E4M3_TILE, E4M3_WEIGHT_BLOCK),  # grad_out (1x128 along N) @ w
        grad_weight=GemmSpec(E4M3_TILE, E4M3_TILE),  # grad_out.T @ x, both 1x128 along tokens
    )


# --- MX ------------------------------------------------------------------------------------------


def mx_operand(
    fmt: str, rule: ScaleRule = ScaleRule.MX_FLOOR, rounding: Rounding = Rounding.NEAREST
) -> OperandSpec:
    """An OCP MX operand: 32-element blocks along the contraction axis, e8m0 scale by ``rule``."""
    return OperandSpec(fmt, Granularity.MX, scale_rule=rule, rounding=rounding)


def mx_layer(
    weight_activation: str, gradient: str, rule: ScaleRule = ScaleRule.MX_FLOOR
) -> LayerSpec:
    """MX in all three GEMMs: ``weight_activation`` for x and w, ``gradient`` for grad_out."""
    return uniform_layer(mx_operand(weight_activation, rule), mx_operand(gradient, rule))


def mxfp4_layer(hadamard_block: int = MXFP4_HADAMARD_BLOCK) -> LayerSpec:
    """Tseng et al. 2025: bf16 forward; MXFP4 backward with stochastic rounding and an RHT."""
    sr = mx_operand("fp4_e2m1", ScaleRule.MX_CEIL, Rounding.STOCHASTIC)
    backward = GemmSpec(sr, sr, Transform.HADAMARD, hadamard_block)
    return LayerSpec(forward=GemmSpec(BF16, BF16), grad_input=backward, grad_weight=backward)


# --- NVFP4 ---------------------------------------------------------------------------------------

NVFP4_ACTIVATION = OperandSpec("fp4_e2m1", Granularity.NVFP4)  # 1x16 blocks
NVFP4_WEIGHT = OperandSpec("fp4_e2m1", Granularity.NVFP4, block_size=(16, 16))
NVFP4_GRADIENT = OperandSpec("fp4_e2m1", Granularity.NVFP4, rounding=Rounding.STOCHASTIC)


def nvfp4_layer(hadamard_block: int = NVFP4_HADAMARD_BLOCK) -> LayerSpec:
    return LayerSpec(
        forward=GemmSpec(NVFP4_ACTIVATION, NVFP4_WEIGHT),
        grad_input=GemmSpec(NVFP4_GRADIENT, NVFP4_WEIGHT),
        grad_weight=GemmSpec(NVFP4_GRADIENT, NVFP4_ACTIVATION, Transform.HADAMARD, hadamard_block),
    )


# Any model's blocks (Llama's model.layers.<i>, GPT-2's transformer.h.<i>, ...); `convert`
# resolves the last one for the model at hand.
KEEP_FIRST_LAST_BLOCKS = (
    Override(FIRST_BLOCK, None, "first block (or layer, without blocks) kept in bf16 (NVFP4)"),
    Override(LAST_BLOCK, None, "last block (or layer, without blocks) kept in bf16 (NVFP4)"),
)
# Checked after KEEP_HIGH_PRECISION, so that the heads keep their own reason.
KEEP_OUTSIDE_BLOCKS = (
    Override(OUTSIDE_BLOCKS, None, "outside the blocks (not a block's GEMM) kept in bf16 (NVFP4)"),
)


def fine_grained_recipe(
    name: str,
    description: str,
    layer: LayerSpec,
    reference: str,
    overrides: tuple[Override, ...] = (),
    last_overrides: tuple[Override, ...] = (),
) -> Recipe:
    """Converted layers follow ``layer``; everything else runs under bf16 autocast; fp32 params.
    ``overrides`` come before the heads and routers every preset keeps, ``last_overrides`` after."""
    return Recipe(
        name,
        description,
        layer=layer,
        autocast="bf16",
        overrides=overrides + KEEP_HIGH_PRECISION + last_overrides,
        reference=reference,
    )


register_preset(
    fine_grained_recipe(
        "fp8-blockwise",
        "fp8 e4m3, 1x128 tiles on activations and gradients, 128x128 weight blocks, "
        "fp32 accumulation of per-block partial products",
        blockwise_fp8_layer(),
        "DeepSeek-V3 technical report §3.3 (fine-grained fp8)",
    )
)
for _rule, _suffix, _scale in (
    (ScaleRule.MX_FLOOR, "", "OCP floor"),
    (ScaleRule.MX_CEIL, "-rceil", "round-up"),
):
    register_preset(
        fine_grained_recipe(
            f"mxfp8{_suffix}",
            f"MXFP8: e4m3 elements, 32-element blocks, e8m0 {_scale} scale, every GEMM",
            mx_layer("fp8_e4m3", "fp8_e4m3", _rule),
            "OCP MX v1.0; Rouhani et al. 2023; torchao MX training",
        )
    )
    register_preset(
        fine_grained_recipe(
            f"mxfp6{_suffix}",
            f"MXFP6: e2m3 weights/activations, e3m2 gradients, e8m0 {_scale} scale, every GEMM",
            mx_layer("fp6_e2m3", "fp6_e3m2", _rule),
            "OCP MX v1.0; Rouhani et al. 2023",
        )
    )
register_preset(
    fine_grained_recipe(
        "mxfp4",
        "bf16 forward; MXFP4 e2m1 backward GEMMs with stochastic rounding and a random "
        "Hadamard transform (blocks of 64)",
        mxfp4_layer(),
        "Tseng et al. 2025, Training LLMs with MXFP4",
    )
)
register_preset(
    fine_grained_recipe(
        "nvfp4",
        "NVFP4: e2m1 in 16-blocks with e4m3 block and fp32 tensor scales, 16x16 weight blocks, "
        "SR gradients, RHT on Wgrad inputs, first and last blocks in bf16",
        nvfp4_layer(),
        'NVIDIA 2025, "Pretraining Large Language Models with NVFP4"',
        overrides=KEEP_FIRST_LAST_BLOCKS,
        last_overrides=KEEP_OUTSIDE_BLOCKS,
    )
)
