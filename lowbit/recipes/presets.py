"""Named recipes. The names are public interface: scripts and configs refer to them.

Each preset cites the paper or system it follows; docs/recipes.md tabulates them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace

from lowbit.errors import UsageError
from lowbit.formats import Granularity, ScaleRule
from lowbit.recipes.recipe import (
    DTYPES,
    OUTPUT_HEAD,
    GemmSpec,
    LayerSpec,
    LossScaling,
    OperandSpec,
    Override,
    Recipe,
    Scaling,
    UpdateRounding,
    uniform_layer,
)

BF16 = OperandSpec("bf16")
FP16 = OperandSpec("fp16")
E4M3 = OperandSpec("fp8_e4m3")
E5M2 = OperandSpec("fp8_e5m2")

# Layers that low-precision recipes keep in high precision: the output head (its logits feed the
# softmax of a large vocabulary), the classification head and mixture-of-experts routers (a
# rounding flips which experts a token goes to). Embeddings and norms are not GEMM layers and are
# never converted. Published fp8 recipes do the same (torchao, Transformer Engine and DeepSeek-V3
# keep the output head in bf16; DeepSeek-V3 its MoE gating too). The output head is the module
# transformers' ``get_output_embeddings()`` names (`OUTPUT_HEAD`: GPT-NeoX's ``embed_out``,
# BioGPT's ``output_projection``), and the heads are also found by their names at any depth (a
# model inside a wrapper, ``_orig_mod.`` under torch.compile, a model without that method):
# causal-LM ``lm_head``, masked-LM ``cls.predictions.decoder``, sequence-classification ``score``,
# the ``classifier`` of token/sequence classifiers (RoBERTa's two-layer one included) and
# ``head``. Routers that are plain linear layers: DBRX's and JetMoE's ``router.layer``, AFMoE's
# ``router.gate``, Gemma4's ``router.proj``, HunYuan-MoE's ``gate.wg``, the Qwen MoE families'
# ``shared_expert_gate``. The others are router modules of their own (`is_router`: the Qwen MoE
# families' and Mixtral's ``TopKRouter``), never converted and reported with the same reason.
# `lowbit.nn.convert.recipe_for_model` adds, for the model at hand, the layers found by their
# place rather than their names to `KEEP_CLASSIFIERS` (a convolutional network's final linear
# layer: torchvision's ``fc``) and `KEEP_ROUTERS` (every linear layer inside a router module,
# `is_router_module`: Switch Transformers' ``router.classifier``, Zaya's router MLP).
ROUTER_KEPT = "mixture-of-experts router kept in high precision"
# A router module of no mixture of experts (GraniteDocling's ``density_router``, which sends each
# sample down a coarse or a fine path): kept for the same reason, found by `router_layer_names`.
OTHER_ROUTER_KEPT = "router kept in high precision (a rounding would change where it sends inputs)"
CLASSIFIER_KEPT = "classification head kept in high precision"
KEEP_ROUTERS = Override(
    "*.router.layer|*.router.gate|*.router.proj|*.gate.wg|*shared_expert_gate", None, ROUTER_KEPT
)
KEEP_CLASSIFIERS = Override(
    "classifier|*.classifier|classifier.*|*.classifier.*|head|*.head|score|*.score",
    None,
    CLASSIFIER_KEPT,
)
KEEP_HIGH_PRECISION = (
    Override(OUTPUT_HEAD, None, "output head kept in high precision"),
    Override("lm_head|*.lm_head", None, "output head kept in high precision"),
    Override("*predictions.decoder", None, "output head kept in high precision"),
    KEEP_ROUTERS,  # before the heads: Switch Transformers' ``router.classifier`` is a router
    KEEP_CLASSIFIERS,
)

_PRESETS: dict[str, Recipe] = {}
_BUILT_IN: set[str] = set()  # the names of lowbit's own presets


def register_preset(recipe: Recipe) -> Recipe:
    """Add one of lowbit's own presets (the modules of `lowbit.recipes`)."""
    _PRESETS[recipe.name] = recipe
    _BUILT_IN.add(recipe.name)
    return recipe


_NOT_IN_A_FOLDER_NAME = re.compile(r"[\s/\\]+")  # whitespace and path separators


def is_built_in(name: str) -> bool:
    """Whether ``name`` is one of lowbit's own presets (``auto:`` budgets included), whose
    definitions lowbit's own releases own; a user's recipe is defined by whoever registered it."""
    return name in _BUILT_IN or name.startswith("auto:")


def own_name_fix(name: str) -> str:
    """The way to give a recipe changed from preset ``name`` a name of its own, as the errors
    that refuse it under the preset's name (`register`, a precision state's check) write it."""
    return f"dataclasses.replace(recipe, name='{name}-custom')"


def register(recipe: Recipe) -> Recipe:
    """Make a user's recipe a preset that `get_recipe` (and ``lowbit train --recipe``) finds by
    name; registering it again replaces it. A built-in preset's name is refused: replaced, every
    run, report and test naming it would compute otherwise without a word; so is an ``auto:``
    name, which `get_recipe` reads as the auto recipe's budget, and a name with a slash or
    whitespace: ``lowbit train --recipe NAME`` names the run folder ``runs/TASK-NAME-TIME``
    (``my/fp8`` made ``runs/causal-lm-my/``)."""
    if not isinstance(recipe, Recipe):  # a preset's name, say: an AttributeError below
        raise UsageError(
            f"register takes a Recipe, got {recipe!r}; fix: e.g. register(dataclasses.replace("
            "get_recipe('fp8-tensorwise'), name='fp8-mine'))"
        )
    if _NOT_IN_A_FOLDER_NAME.search(recipe.name):
        suggestion = _NOT_IN_A_FOLDER_NAME.sub("-", recipe.name)
        raise UsageError(
            f"recipe name {recipe.name!r}: a run folder is named after it; fix: a name without "
            f"slashes or spaces, e.g. {suggestion!r}"
        )
    if recipe.name in _BUILT_IN and _PRESETS[recipe.name] != recipe:
        raise UsageError(
            f"recipe {recipe.name!r} is a built-in preset; fix: give yours another name, e.g. "
            + own_name_fix(recipe.name)
        )
    if recipe.name == "auto" or recipe.name.startswith("auto:"):
        raise UsageError(
            f"recipe name {recipe.name!r}: 'auto:BUDGET' names the auto recipe's budget; fix: "
            "another name"
        )
    _PRESETS[recipe.name] = recipe
    return recipe


register_preset(Recipe("fp32", "fp32 everywhere: the reference", reference="IEEE fp32 training"))
register_preset(
    Recipe(
        "bf16-mixed",
        "fp32 params and optimizer, bf16 compute via autocast",
        autocast="bf16",
        reference="torch.autocast bf16 (Kalamkar et al. 2019)",
    )
)
register_preset(
    Recipe(
        "fp16-mixed",
        "fp32 params, fp16 compute, dynamic loss scaling",
        autocast="fp16",
        layer=uniform_layer(FP16),
        loss_scaling=LossScaling.DYNAMIC,
        emulate_fp16_gemms_on_cpu=True,
        reference="Micikevicius et al. 2018; torch.autocast + GradScaler",
    )
)
register_preset(
    Recipe(
        "fp16-low",
        "fp16 params and activations, fp32 master weights, dynamic loss scaling (O2)",
        param_dtype="fp16",
        master_dtype="fp32",
        layer=uniform_layer(FP16),
        loss_scaling=LossScaling.DYNAMIC,
        emulate_fp16_gemms_on_cpu=True,
        reference='Micikevicius et al. 2018; NVIDIA Apex "O2"',
    )
)
register_preset(
    Recipe(
        "bf16-low",
        "bf16 params and activations, fp32 master weights (O2)",
        param_dtype="bf16",
        master_dtype="fp32",
        reference='NVIDIA Apex "O2" with bf16',
    )
)
register_preset(
    Recipe(
        "bf16-pure",
        "bf16 params, no master weights, nearest rounding (small updates are lost)",
        param_dtype="bf16",
        reference="Zamirai et al. 2020 (baseline)",
    )
)
register_preset(
    Recipe(
        "bf16-pure-sr",
        "bf16 params, no master weights, stochastic rounding of the update",
        param_dtype="bf16",
        update_rounding=UpdateRounding.STOCHASTIC,
        reference="Zamirai et al. 2020",
    )
)
register_preset(
    Recipe(
        "bf16-pure-kahan",
        "bf16 params, no master weights, Kahan-compensated update (one bf16 buffer)",
        param_dtype="bf16",
        update_rounding=UpdateRounding.KAHAN,
        reference="Zamirai et al. 2020",
    )
)


def fp8_recipe(name: str, description: str, layer: LayerSpec, reference: str) -> Recipe:
    """fp8 GEMMs in converted layers, bf16 autocast elsewhere, fp32 params (torchao float8)."""
    return Recipe(
        name,
        description,
        layer=layer,
        autocast="bf16",
        overrides=KEEP_HIGH_PRECISION,
        reference=reference,
    )


register_preset(
    fp8_recipe(
        "fp8-tensorwise",
        "fp8 e4m3 forward, e5m2 gradients, one current scale per tensor",
        uniform_layer(E4M3, E5M2),
        "torchao float8 tensorwise; Micikevicius et al. 2022",
    )
)
_DELAYED_E4M3 = OperandSpec("fp8_e4m3", scaling=Scaling.DELAYED, amax_history=16)
_DELAYED_E5M2 = OperandSpec("fp8_e5m2", scaling=Scaling.DELAYED, amax_history=16)
register_preset(
    fp8_recipe(
        "fp8-delayed",
        "fp8 e4m3/e5m2 with delayed scaling from a 16-step amax history",
        uniform_layer(_DELAYED_E4M3, _DELAYED_E5M2),
        "NVIDIA Transformer Engine DelayedScaling",
    )
)
# torchao's "rowwise" recipe: e4m3 for every operand (the per-row scale gives gradients the range
# e5m2 would), scales rounded down to powers of two.
_ROW_E4M3 = OperandSpec("fp8_e4m3", Granularity.AXIS, scale_rule=ScaleRule.POW2)
register_preset(
    fp8_recipe(
        "fp8-rowwise",
        "fp8 e4m3 everywhere, one power-of-two scale per row along the contraction axis",
        uniform_layer(_ROW_E4M3),
        "torchao float8 rowwise (Float8LinearRecipeName.ROWWISE)",
    )
)
_INT8_ROW = OperandSpec("int8", Granularity.AXIS)
register_preset(
    Recipe(
        "int8",
        "row-wise symmetric int8 weights and activations in the forward GEMMs, bf16 backward",
        layer=LayerSpec(
            forward=GemmSpec(_INT8_ROW, _INT8_ROW),
            grad_input=GemmSpec(BF16, BF16),
            grad_weight=GemmSpec(BF16, BF16),
        ),
        autocast="bf16",
        overrides=KEEP_HIGH_PRECISION,
        reference="SwitchBack (Wortsman et al. 2023), int8 forward GEMMs",
    )
)


def names() -> list[str]:
    return list(_PRESETS)


def accepted_names() -> list[str]:
    """Every name `get_recipe` takes: the presets, and auto's other budgets (auto:fp6, auto:fp4),
    which are not presets of their own."""
    from lowbit.recipes.auto import BUDGETS

    return [*_PRESETS, *(f"auto:{budget}" for budget in BUDGETS if budget != "fp8")]


def same_recipe(a: str | None, b: str | None) -> bool:
    """Whether two recipe names name one recipe, though spelled otherwise (``auto`` and its
    default budget ``auto:fp8``); a name this lowbit does not know (a user's recipe not
    registered in this process) is compared as spelled."""
    if a == b:
        return True
    try:
        return get_recipe(a) == get_recipe(b)
    except UsageError:
        return False


def spelt_alike(name: str, valid: list[str]) -> list[str]:
    """The names of ``valid`` that ``name`` misspells or shortens, in their order (empty: none).

    One name where ``name`` is it in another case, with spaces around it or underscores for
    hyphens (a config file's 'FP8-Tensorwise ', 'fp8_tensorwise', written as the format names
    are). Otherwise every name whose parts (split at hyphens and colons) ``name``'s parts begin
    or, from three characters on, end: ``bf16`` is 'bf16-mixed', 'bf16-low', 'bf16-pure', ...;
    ``mx`` the MX recipes; ``fp4`` 'mxfp4' and 'nvfp4'; ``fp8-row`` 'fp8-rowwise' (these had no
    hint but the list of 22 names). Else a near miss ('fp8-rowise', 'bf16mixed') with the same
    numbers: a bit width is no typo ('mxfp4-rceil' was answered 'mxfp8-rceil', 'nvfp8' 'nvfp4',
    'fp32-mixed' 'fp16-mixed')."""
    hyphened = {re.sub(r"[\s_]+", "-", known.lower()): known for known in valid}
    spelt = re.sub(r"[\s_]+", "-", name.strip().lower())
    if spelt in hyphened:
        return [hyphened[spelt]]
    parts = _parts(spelt.strip("-:"))  # 'bf16-' too
    if len(spelt) >= 2 and all(parts):
        shortened = [
            known
            for hyphen, known in hyphened.items()
            if all(any(_shortens(part, own) for own in _parts(hyphen)) for part in parts)
        ]
        if shortened:
            return shortened
    numbers = re.findall(r"\d+", spelt)
    close = difflib.get_close_matches(spelt, list(hyphened), n=3, cutoff=0.8)
    return [hyphened[c] for c in close if re.findall(r"\d+", c) == numbers][:1]


def _parts(name: str) -> list[str]:
    return re.split(r"[-:]", name)


def _shortens(part: str, own: str) -> bool:
    """Whether ``part`` of a typed name is the start of ``own``, a part of a recipe's name, or
    (three characters or more) its end: ``fp4`` of ``mxfp4``, not ``ed`` of ``mixed``."""
    return own.startswith(part) or (len(part) >= 3 and own.endswith(part))


def did_you_mean(names: list[str], notes: dict[str, str] | None = None) -> str:
    """``did you mean 'a'?``, or ``did you mean 'a', 'b' or 'c'?`` for several (`spelt_alike`);
    a name's note, where ``notes`` has one, follows it in parentheses (a flag's help)."""
    notes = notes or {}
    quoted = [repr(name) + (f" ({notes[name]})" if notes.get(name) else "") for name in names]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"did you mean {listed}?"


def get_recipe(name: str | Recipe) -> Recipe:
    """The preset called ``name`` (a Recipe is returned as it is)."""
    if isinstance(name, Recipe):
        return name
    if isinstance(name, str) and name.startswith("auto:"):  # auto:BUDGET (lowbit.recipes.auto)
        from lowbit.recipes.auto import auto_recipe

        return auto_recipe(name.partition(":")[2])
    try:
        return _PRESETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name (a list from a config file)
        valid = accepted_names()
        alike = spelt_alike(str(name), valid)
        # a user's recipe is registered in the process that runs the user's script: `lowbit train
        # --recipe NAME` (a process of its own) refused it as if it were misspelt, and a name of
        # one's own may well be spelt like a preset's (``fp8-rows``, "did you mean 'fp8-rowwise'?")
        own = (
            "a recipe of your own (lowbit.recipes.register) is known only to the Python process "
            "that registers it (docs/recipes.md, Your own recipe)"
        )
        # the hint before a near miss's fix, which ends the line as every "did you mean" does
        fix = f"{own}; fix: {did_you_mean(alike)}" if alike else f"fix: one of those ({own})"
        raise UsageError(
            f"unknown recipe {name!r}; valid recipes: {', '.join(valid)}; {fix}"
        ) from None


def _spaces_dropped(text: str, separator: str) -> str:
    """``text`` without the spaces around each ``separator`` and at its ends."""
    return separator.join(part.strip() for part in text.split(separator))


def parse_override(text: str, recipe: Recipe) -> Override:
    """An override from ``PATTERN=WHAT`` as `lowbit train --override` takes it.

    ``WHAT`` is ``keep`` (not converted: the layer runs as the rest of the model does, so under
    an autocast recipe in autocast's dtype), a preset name (that preset's GEMM operands,
    `Recipe.compute_layer`: ``fp32`` computes the layer in fp32 even under autocast, ``bf16-mixed``
    in bf16), or a comma list ``OPERAND:FORMAT`` changing operands of the recipe's own GEMM
    operands, with OPERAND one of ``forward.x, forward.w, grad_input.grad_out, grad_input.w,
    grad_weight.grad_out, grad_weight.x`` (e.g. ``model.layers.0.*=grad_weight.grad_out:bf16``;
    of a layer the recipe keeps, the operands of its compute dtype: `Recipe.layer_for`).
    """
    pattern, sep, what = text.partition("=")
    # spaces around the separators (a config file's 'lm_head = keep', 'forward.x:bf16,
    # forward.w:bf16') are dropped: no module name, recipe name or format holds one at either
    # end. Kept, ' keep' was refused as a misspelt 'keep', and 'lm_head ' or ' lm_head' matched
    # no layer.
    pattern = _spaces_dropped(pattern, "|")
    what = ",".join(_spaces_dropped(item, ":") for item in what.split(","))
    if not sep or not pattern or not what:
        raise UsageError(
            f"override {text!r} is not PATTERN=WHAT; fix: write it as e.g. 'lm_head=keep' or "
            "'model.layers.0.*=grad_weight.grad_out:bf16'"
        )
    if what == "keep":
        return Override(pattern, None, f"override {text}")
    if what == "auto" or what.startswith("auto:"):
        # auto's layer is only its bf16 start, and an override fixes a layer's formats: the
        # controller would never move these layers off bf16
        raise UsageError(
            f"override {text!r}: auto chooses formats for a whole run, not for the layers of an "
            f"override (they would stay in bf16); fix: --recipe {what}, with overrides for the "
            "layers it must not change"
        )
    if what in _PRESETS:
        return Override(pattern, _PRESETS[what].compute_layer, f"override {text}")
    base = recipe.compute_layer
    operands = dict(base.operands())
    named = [item.partition(":")[0] for item in what.split(",")]
    repeated = sorted({operand for operand in named if named.count(operand) > 1})
    if repeated:  # the last one silently won; a typo for another operand, most likely
        raise UsageError(
            f"override {text!r} names {', '.join(repeated)} more than once; fix: name each "
            "operand once, with the format it is to have"
        )
    # a misspelt 'keep' or preset ('Keep', 'fp8_tensorwise') read as a malformed operand list
    # one name alone: 'bf16' (a prefix of five presets) is more likely a format, which the
    # OPERAND:FORMAT refusal below shows how to write
    alike = [] if ":" in what else spelt_alike(what, ["keep", *_PRESETS])
    if len(alike) == 1:
        raise UsageError(f"override {text!r}: unknown {what!r}; fix: {did_you_mean(alike)}")
    for item in what.split(","):
        operand, _, fmt = item.partition(":")
        if operand not in operands or not fmt:
            raise UsageError(
                f"override {text!r}: {item!r} is not OPERAND:FORMAT; fix: OPERAND:FORMAT with "
                f"OPERAND one of {', '.join(operands)} (e.g. forward.x:bf16), or 'keep', or a "
                "recipe name"
            )
        old = operands[operand]
        plain = fmt in DTYPES
        try:
            operands[operand] = OperandSpec(fmt) if plain else replace(old, format=fmt)
        except UsageError as error:  # an unknown format, or one the operand's scaling refuses
            problem = str(error).partition("; fix: ")[0]  # its fix is the Python API's
            raise UsageError(
                f"override {text!r}: {problem}; fix: give {operand} a format its "
                f"{old.granularity.value} scaling takes, or fp32, bf16 or fp16 (cast without a "
                "scale)"
            ) from None
    layer = base.with_operands(operands)
    return Override(pattern, layer, f"override {text}", operands=tuple(named))
