"""Recipes: what precision each GEMM operand, parameter, gradient and update uses.

A recipe is a frozen dataclass composed of smaller frozen specs. A layer's three GEMMs are

    forward       out    = x @ w.T         contraction over in_features
    grad_input    grad_x = grad_out @ w    contraction over out_features
    grad_weight   grad_w = grad_out.T @ x  contraction over the tokens (batch x sequence)

and each of the six operands has an `OperandSpec`, quantized along its GEMM's contraction axis.
Everything outside those GEMMs (bias, norms, softmax, losses) runs in the recipe's compute dtype.
"""

from __future__ import annotations

import fnmatch
import glob
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from numbers import Real

import torch

from lowbit.errors import UsageError, member
from lowbit.formats import FloatFormat, Granularity, Rounding, ScaleRule, get
from lowbit.formats import names as format_names
from lowbit.formats.scaling import (
    MX_BLOCK,
    NVFP4_BLOCK,
    block_shape,
    check_format_for_granularity,
    check_rule_for_granularity,
    default_rule,
)


class Scaling(str, Enum):
    CURRENT = "current"  # scale from this tensor's amax (just-in-time)
    DELAYED = (
        "delayed"  # scale from the max of an amax history of earlier steps (Transformer Engine)
    )


class LossScaling(str, Enum):
    NONE = "none"
    STATIC = "static"
    DYNAMIC = "dynamic"


class UpdateRounding(str, Enum):
    NEAREST = "nearest"  # round the updated weight to the parameter dtype, ties to even
    STOCHASTIC = "stochastic"  # unbiased rounding of the updated weight (Zamirai et al. 2020)
    KAHAN = "kahan"  # keep the rounding error in a compensation buffer (Kahan summation)


class Transform(str, Enum):
    NONE = "none"
    HADAMARD = "hadamard"  # random Hadamard transform along the contraction axis


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The recipes' name of a dtype (``fp32``, ``bf16``, ``fp16``), else torch's."""
    names = {value: name for name, value in DTYPES.items()}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _check_type(value, kind: type, what: str, example: str) -> None:
    """Refuse a spec of another type when it is written: read later (a format name where an
    `OperandSpec` belongs), it failed at the first conversion with an AttributeError."""
    if not isinstance(value, kind):
        raise UsageError(
            f"{what} must be of type {kind.__name__}, got {value!r}; fix: e.g. {example}"
        )


def _positive_int(value, field_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{field_name} must be a positive whole number, got {value!r}")


AMAX_HISTORY = 16  # steps in a delayed scaling's amax history, unless a spec says otherwise
# the blocks of the granularities whose block_size may be left out (`block_shape`)
_DEFAULT_BLOCKS = {Granularity.MX: (1, MX_BLOCK), Granularity.NVFP4: (1, NVFP4_BLOCK)}


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized: format, blocks, scale rule, rounding and scaling."""

    format: str = "fp32"
    granularity: Granularity = Granularity.TENSOR
    block_size: int | tuple[int, int] | None = None
    scale_rule: ScaleRule | None = None
    rounding: Rounding = Rounding.NEAREST
    scaling: Scaling = Scaling.CURRENT
    amax_history: int = AMAX_HISTORY

    def __post_init__(self) -> None:
        fmt = get(self.format)
        if not isinstance(self.format, str) and fmt.name in format_names() and get(fmt.name) == fmt:
            # a registered format given as its object (`lowbit.formats.get`) is its name: as an
            # object it equalled no preset's spec, described as its repr, and get('bf16') was
            # never a plain cast (refused as a scaled bf16)
            object.__setattr__(self, "format", fmt.name)
        if isinstance(self.block_size, list):  # a config file's [128, 128]: hashable, as a tuple
            object.__setattr__(self, "block_size", tuple(self.block_size))
        object.__setattr__(
            self, "granularity", member(Granularity, self.granularity, "granularity")
        )
        object.__setattr__(self, "rounding", member(Rounding, self.rounding, "rounding"))
        object.__setattr__(self, "scaling", member(Scaling, self.scaling, "scaling"))
        # refused when the spec is written (an --override included), not at the first forward:
        # e8m0 elements, NVFP4 blocks of another format, MX blocks of integers
        check_format_for_granularity(fmt, self.granularity)
        if self.scale_rule is not None:
            rule = member(ScaleRule, self.scale_rule, "scale rule")
            check_rule_for_granularity(rule, self.granularity)
            object.__setattr__(self, "scale_rule", rule)
        # as quantize checks it: a size given to 'tensor'/'axis', which have no blocks, and a
        # missing 'block'/'block2d' size (the first forward refused it)
        block_shape(self.granularity, (1, 1), self.block_size)
        if self.scaling is Scaling.DELAYED and self.granularity is not Granularity.TENSOR:
            raise UsageError("delayed scaling needs granularity 'tensor' (one amax per tensor)")
        if type(self.amax_history) is int and self.amax_history < 1:
            raise UsageError("amax_history must be at least 1")
        _positive_int(self.amax_history, "amax_history")  # 2.5, True: a whole number
        if self.scaling is not Scaling.DELAYED and self.amax_history != AMAX_HISTORY:
            # a history length without scaling='delayed' read as delayed scaling, and the operand
            # scaled from its current amax without a word (`describe` shows no history)
            delayed = "" if self.is_plain_cast else "scaling='delayed' (granularity 'tensor'), or "
            warnings.warn(
                f"amax_history={self.amax_history} is unused: it is the length of delayed "
                f"scaling's amax history, and this {fmt.name} operand's scaling is "
                f"'{self.scaling.value}'; fix: {delayed}leave amax_history out",
                stacklevel=3,
            )
        if self.is_plain_cast and self.granularity is not Granularity.TENSOR:
            raise UsageError(f"{fmt.name} operands are cast without scales; use granularity tensor")
        # A plain cast rounds to nearest with no scale (`lowbit.nn.operand.plain_cast`): these
        # were dropped without a word (a bf16 operand with stochastic rounding rounded to nearest)
        asked = {
            "stochastic rounding": self.rounding is not Rounding.NEAREST,
            "delayed scaling": self.scaling is Scaling.DELAYED,
            "a scale rule": self.scale_rule is not None,
        }
        ignored = [what for what, given in asked.items() if given]
        if self.is_plain_cast and ignored:
            raise UsageError(
                f"{fmt.name} operands are cast to the dtype without a scale, rounding to nearest: "
                f"{' and '.join(ignored)} would be ignored; fix: drop it, or a scaled format "
                "(fp8_e4m3, fp8_e5m2, fp6/fp4 in MX blocks, int8)"
            )
        # A scaled operand's largest values sit near its format's max, so the product of two such
        # operands (up to max**2) must fit the GEMM's fp32 accumulator: tf32 (max 3.4e38, fp32's
        # range) gave inf and NaN outputs; fp8_e5m2's 57344**2 is far below fp32's max.
        if not self.is_plain_cast and isinstance(fmt, FloatFormat) and fmt.max**2 > _FP32_MAX:
            raise UsageError(
                f"{fmt.name} has fp32's range: a scaled {fmt.name} operand (amax at {fmt.max:.3g}) "
                f"overflows the fp32 GEMM it feeds; fix: fp32 or bf16 (cast without a scale), or "
                f"an fp8/fp6/fp4 format"
            )

    @property
    def is_plain_cast(self) -> bool:
        """fp32/bf16/fp16 operands are rounded to the dtype, with no scale (fp32: untouched)."""
        return self.format in DTYPES

    @property
    def is_identity(self) -> bool:
        return self.format == "fp32"

    def describe(self) -> str:
        """``FORMAT/GRANULARITY`` and whatever differs from that granularity's defaults: a block
        size (``block1x128``, ``block2d128x128``, ``mx(1x16)``, ``nvfp4(16x16)``; MX's 32 and
        NVFP4's 16 are left out), a scale rule, delayed scaling, stochastic rounding. Two specs
        that quantize differently describe differently (a hidden MX block size made a 16-block
        and a 32-block recipe read alike)."""
        if self.is_plain_cast:
            return self.format
        text = f"{get(self.format).name}/{self.granularity.value}"
        if self.block_size is not None:
            rows, cols = block_shape(self.granularity, (1, 1), self.block_size)
            if (rows, cols) != _DEFAULT_BLOCKS.get(self.granularity):
                blocky = self.granularity in (Granularity.BLOCK, Granularity.BLOCK2D)
                text += f"{rows}x{cols}" if blocky else f"({rows}x{cols})"
        if self.scale_rule is not None and self.scale_rule is not default_rule(self.granularity):
            text += f"/{self.scale_rule.value}"
        if self.scaling is Scaling.DELAYED:
            text += f"/delayed{self.amax_history}"
        if self.rounding is Rounding.STOCHASTIC:
            text += "/sr"
        return text


@dataclass(frozen=True)
class GemmSpec:
    """The two operands of one GEMM ``a @ b.T`` (both contracted along their last axis)."""

    a: OperandSpec = field(default_factory=OperandSpec)
    b: OperandSpec = field(default_factory=OperandSpec)
    transform: Transform = Transform.NONE
    transform_block: int = 32

    def __post_init__(self) -> None:
        for operand in (self.a, self.b):
            _check_type(operand, OperandSpec, "a GEMM operand", "OperandSpec('fp8_e4m3')")
        object.__setattr__(self, "transform", member(Transform, self.transform, "transform"))
        _positive_int(self.transform_block, "transform_block")
        if self.transform_block & (self.transform_block - 1):
            raise UsageError(
                f"transform_block must be a power of two (Hadamard), got {self.transform_block}"
            )

    def describe(self) -> str:
        """``A x B``, and a transform with its block: ``... (+hadamard64)``."""
        text = f"{self.a.describe()} x {self.b.describe()}"
        if self.transform is not Transform.NONE:
            text += f" (+{self.transform.value}{self.transform_block})"
        return text


@dataclass(frozen=True)
class LayerSpec:
    """The three GEMMs of a linear (or im2col convolution) layer."""

    forward: GemmSpec = field(default_factory=GemmSpec)
    grad_input: GemmSpec = field(default_factory=GemmSpec)
    grad_weight: GemmSpec = field(default_factory=GemmSpec)

    def __post_init__(self) -> None:
        for gemm in (self.forward, self.grad_input, self.grad_weight):
            _check_type(gemm, GemmSpec, "a layer's GEMM", "GemmSpec(OperandSpec('fp8_e4m3'))")

    def operands(self) -> dict[str, OperandSpec]:
        """Every operand by a stable name: ``forward.x``, ``grad_weight.grad_out`` ..."""
        return {
            "forward.x": self.forward.a,
            "forward.w": self.forward.b,
            "grad_input.grad_out": self.grad_input.a,
            "grad_input.w": self.grad_input.b,
            "grad_weight.grad_out": self.grad_weight.a,
            "grad_weight.x": self.grad_weight.b,
        }

    def with_operands(self, specs: dict[str, OperandSpec]) -> LayerSpec:
        """This layer with the operands that ``specs`` names (`operands`) replaced; each GEMM
        keeps its transform and its block (nvfp4's 16, mxfp4's 64 Hadamard blocks)."""
        new = {**self.operands(), **specs}
        return LayerSpec(
            forward=replace(self.forward, a=new["forward.x"], b=new["forward.w"]),
            grad_input=replace(
                self.grad_input, a=new["grad_input.grad_out"], b=new["grad_input.w"]
            ),
            grad_weight=replace(
                self.grad_weight, a=new["grad_weight.grad_out"], b=new["grad_weight.x"]
            ),
        )

    @property
    def is_identity(self) -> bool:
        return all(spec.is_identity for spec in self.operands().values())

    def describe(self) -> str:
        return (
            f"fwd {self.forward.describe()}; dgrad {self.grad_input.describe()}; "
            f"wgrad {self.grad_weight.describe()}"
        )


def uniform_layer(forward: OperandSpec, backward: OperandSpec | None = None) -> LayerSpec:
    """A layer whose forward operands share one spec and whose gradient GEMMs use ``backward``
    for the output gradient and ``forward`` for the weight and activation."""
    backward = backward or forward
    return LayerSpec(
        forward=GemmSpec(forward, forward),
        grad_input=GemmSpec(backward, forward),
        grad_weight=GemmSpec(backward, forward),
    )


_FP32_MAX = torch.finfo(torch.float32).max
RECIPE_DEFAULT = "recipe default"  # `Recipe.layer_for`'s reason when no override matched
LAST = "{last}"  # Override pattern placeholder: the highest block index (see Override.resolve)
# Whole-pattern placeholders for the blocks of a network, for any naming (Llama's model.layers.<i>,
# GPT-2's transformer.h.<i>, BERT's encoder.layer.<i>, T5's encoder.block.<i> and decoder.block.<i>):
# a block is a numbered child of a container (ModuleList/Sequential) that holds modules itself
# (`block_stacks`, `block_of`).
FIRST_BLOCK = "{first block}"  # every module inside the lowest block of each stack of blocks
LAST_BLOCK = "{last block}"  # every module inside the highest block of each stack
# Whole-pattern placeholder for the GEMM layers outside every stack of blocks, in a model that has
# blocks: the projections around the stack (ELECTRA's embeddings_project, ALBERT's
# embedding_hidden_mapping_in, a masked-LM head's dense layer) and the heads. A model without
# blocks has none (its first and last layer are `FIRST_BLOCK` and `LAST_BLOCK`).
OUTSIDE_BLOCKS = "{outside blocks}"
# Whole-pattern placeholder for the model's output head whatever its name (GPT-NeoX's embed_out,
# BioGPT's output_projection): the module transformers' ``get_output_embeddings()`` returns.
OUTPUT_HEAD = "{output head}"


def names_pattern(names: Iterable[str], inside: bool = False) -> str:
    """An override pattern (`Override`) that matches exactly the module ``names`` (``inside``:
    every module inside them instead, ``NAME.*``): each name glob-escaped (`glob.escape`:
    ``add_module`` takes any name without a dot, and ``fc[0]`` as a glob matches ``fc0``, not
    itself), joined by ``|``. The one way names enter a pattern. A name holding ``|``, the
    separator of a pattern's alternatives, cannot be written in one: refused."""
    names = list(names)
    if bad := next((name for name in names if "|" in name), None):
        raise UsageError(
            f"module {bad!r} has a '|' in its name, which separates the alternatives of an "
            "override's pattern, so lowbit cannot name it in one; fix: name the module without "
            "'|' (add_module, or the attribute it is stored under)"
        )
    return "|".join(glob.escape(name) + (".*" if inside else "") for name in names)


def pattern_names(pattern: str) -> list[str]:
    """The module names a `names_pattern` pattern was made of."""
    return [re.sub(r"\[([\[*?])\]", r"\1", alternative) for alternative in pattern.split("|")]


def numbered_levels(name: str) -> list[tuple[str, int]]:
    """Every ``(container, index)`` along module ``name`` whose numbered child holds modules
    itself, outermost first: ``model.layers.3.mlp.experts.7.up`` -> ``[("model.layers", 3),
    ("model.layers.3.mlp.experts", 7)]``; ``features.0`` (a layer, not a block) -> ``[]``."""
    parts = name.split(".")
    return [(".".join(parts[:i]), int(p)) for i, p in enumerate(parts[:-1]) if p.isdecimal()]


def block_stacks(names: Iterable[str]) -> dict[str, set[int]]:
    """The stacks of blocks among a model's module ``names``: each numbered container with its
    block indices. A container of a single block is a stack only when no container of two or more
    blocks lies inside that block: so ``Sequential(model, head)`` is a wrapper, not a stack of one
    block, while a 1-layer model's ``model.layers`` is a stack."""
    containers: dict[str, set[int]] = {}
    for name in names:
        for container, index in numbered_levels(name):
            containers.setdefault(container, set()).add(index)

    def is_stack(container: str, indices: set[int]) -> bool:
        if len(indices) >= 2:
            return True
        inside = f"{container}.{min(indices)}.".lstrip(".")
        return not any(c.startswith(inside) and len(i) >= 2 for c, i in containers.items())

    return {c: i for c, i in containers.items() if is_stack(c, i)}


def block_of(name: str, stacks: dict[str, set[int]] | None = None) -> tuple[str, int] | None:
    """``(stack, index)`` of the block module ``name`` lies in (``model.layers.3.mlp.up`` ->
    ``("model.layers", 3)``), or None: the outermost numbered level whose container is one of the
    model's ``stacks`` (`block_stacks`), so MoE experts inside a block are not blocks; without
    ``stacks``, the outermost numbered level."""
    levels = numbered_levels(name)
    if stacks is None:
        return levels[0] if levels else None
    return next((level for level in levels if level[0] in stacks), None)


def block_indices(names: Iterable[str]) -> dict[str, set[int]]:
    """The blocks a model's module ``names`` hold, by stack: ``{stack: block indices}``, each block
    the outermost numbered level whose container is a stack (`block_of`)."""
    names = list(names)
    stacks = block_stacks(names)
    found: dict[str, set[int]] = {}
    for block in filter(None, (block_of(name, stacks) for name in names)):
        found.setdefault(block[0], set()).add(block[1])
    return found


@dataclass(frozen=True)
class Override:
    """Layers whose fully qualified name matches ``pattern`` (fnmatch glob; alternatives separated
    by ``|``) use ``layer``; ``layer=None`` keeps them in the recipe's high precision (not
    converted). The whole pattern may be `FIRST_BLOCK` or `LAST_BLOCK` (the network's end blocks,
    for any naming), `OUTSIDE_BLOCKS` or `OUTPUT_HEAD`; a ``{last}`` inside a pattern stands for
    the highest index found there."""

    pattern: str
    layer: LayerSpec | None = None
    # empty: ``override PATTERN=keep`` (or ``=`` the layer's specs), as `parse_override` words its
    # own, so that `convert` reports a hand-written one that applies to no layer (a misspelt
    # name) as it does those of ``--override``
    reason: str = ""
    # an OPERAND:FORMAT override's named operands; its other operands are the recipe's own (under
    # `auto`, the controller's to choose). Empty: the override sets the whole layer.
    operands: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise UsageError(f"an override's pattern is a module-name glob, got {self.pattern!r}")
        if self.layer is not None:  # "keep" or a preset name are parse_override's to read
            _check_type(self.layer, LayerSpec, "an override's layer", "None (keep) or a LayerSpec")
        if not self.reason:
            what = "keep" if self.layer is None else self.layer.describe()
            object.__setattr__(self, "reason", f"override {self.pattern}={what}")
        object.__setattr__(self, "operands", tuple(self.operands))  # hashable, as the recipe
        unknown = set(self.operands) - set(LayerSpec().operands())
        if unknown:
            raise UsageError(
                f"unknown override operands {sorted(unknown)}; valid: "
                f"{', '.join(LayerSpec().operands())}"
            )

    def matches(self, name: str) -> bool:
        return any(_matches(name, alternative) for alternative in self.pattern.split("|"))

    def resolve(
        self, names: Iterable[str], layers: Sequence[str] = (), heads: Sequence[str] = ()
    ) -> Override:
        """This override with its placeholders resolved against the module ``names`` of a model,
        each ``|`` alternative on its own (``lm_head|model.layers.{last}.*`` keeps both; resolved
        as one glob, the ``|`` was matched literally and the last block converted without a
        word). ``{last}`` becomes the largest number the names hold at that place:
        ``model.layers.{last}.*`` becomes ``model.layers.3.*`` for a 4-block Llama, and each
        further ``{last}`` the largest inside the one before it. `FIRST_BLOCK` and `LAST_BLOCK`
        become the lowest and highest block of every stack (`block_of`): ``model.layers.3.*``
        there, ``encoder.block.5.*|decoder.block.5.*`` for a T5. A model without blocks (a
        Sequential of single layers, such as the digits CNN) ends in its first and last GEMM
        layer: the first and last of ``layers``, the names of the model's GEMM layers in module
        order. `OUTSIDE_BLOCKS` becomes the ``layers`` in no block (none in a model without
        blocks). `OUTPUT_HEAD` becomes the names in ``heads`` (the modules
        ``get_output_embeddings()`` returns). An alternative without a match matches nothing."""
        names = list(names)
        alternatives = self.pattern.split("|")
        resolved = "|".join(_resolve(alt, names, layers, heads) for alt in alternatives)
        return self if resolved == self.pattern else replace(self, pattern=resolved)


def _matches(name: str, alternative: str) -> bool:
    """Whether module ``name`` matches one alternative of an override's pattern."""
    if alternative == FIRST_BLOCK:  # unresolved: block 0 at the outermost numbered level
        block = block_of(name)
        return block is not None and block[1] == 0
    return fnmatch.fnmatchcase(name, alternative)


def _resolve(
    alternative: str, names: list[str], layers: Sequence[str], heads: Sequence[str]
) -> str:
    """One alternative of `Override.resolve`'s pattern, resolved (unchanged without a match)."""
    if alternative == OUTPUT_HEAD:
        return names_pattern(heads) or alternative
    if alternative == OUTSIDE_BLOCKS:
        stacks = block_stacks(names)
        outside = [layer for layer in layers if block_of(layer, stacks) is None] if stacks else []
        return names_pattern(outside) or alternative
    if alternative in (FIRST_BLOCK, LAST_BLOCK):
        found = block_indices(names)
        first = alternative == FIRST_BLOCK
        if not found:
            return names_pattern([layers[0 if first else -1]]) if layers else alternative
        end = min if first else max
        blocks = [f"{stack}.{end(indices)}".lstrip(".") for stack, indices in found.items()]
        return names_pattern(blocks, inside=True)
    sentinel = "LOWBITLASTINDEX"  # survives fnmatch.translate unescaped
    while LAST in alternative:
        # the first {last} captured, any later one a number of its own (resolved next, inside it)
        regex = fnmatch.translate(alternative.replace(LAST, sentinel))
        regex = re.compile(regex.replace(sentinel, r"(\d+)", 1).replace(sentinel, r"\d+"))
        found = [int(m.group(1)) for name in names if (m := regex.match(name))]
        if not found:
            return alternative
        alternative = alternative.replace(LAST, str(max(found)), 1)
    return alternative


@dataclass(frozen=True)
class Recipe:
    """A complete training precision: GEMMs, parameters, master weights, loss scaling, update."""

    name: str
    description: str
    layer: LayerSpec | None = None  # None: no layer is converted
    autocast: str | None = None  # "bf16"/"fp16": torch.autocast dtype for unconverted ops
    param_dtype: str = "fp32"
    master_dtype: str | None = None  # "fp32": optimizer steps on fp32 copies of 16-bit params
    grad_dtype: str | None = None  # dtype gradients are reduced/stored in (default: param dtype)
    loss_scaling: LossScaling = LossScaling.NONE
    initial_loss_scale: float = 2.0**16
    loss_scale_growth_interval: int = 2000  # overflow-free steps before a dynamic scale doubles
    update_rounding: UpdateRounding = UpdateRounding.NEAREST
    overrides: tuple[Override, ...] = ()
    emulate_fp16_gemms_on_cpu: bool = False  # fp16 compute as fp16-rounded GEMM operands on CPU
    reference: str = ""

    def __post_init__(self) -> None:
        # `register` files a recipe under its name and `lowbit recipes` pads it: a number failed
        # there with an AttributeError or TypeError, an empty name printed a blank row
        examples = {"name": "'fp8-mine'", "description": "'fp8, bf16 head'", "reference": "''"}
        for field_name, example in examples.items():
            _check_type(getattr(self, field_name), str, f"a recipe's {field_name}", example)
        if not self.name.strip():
            raise UsageError("a recipe's name is empty; fix: a name, e.g. 'fp8-mine'")
        scaling = member(LossScaling, self.loss_scaling, "loss scaling")
        object.__setattr__(self, "loss_scaling", scaling)
        rounding = member(UpdateRounding, self.update_rounding, "update rounding")
        object.__setattr__(self, "update_rounding", rounding)
        for name in (self.param_dtype, self.master_dtype, self.grad_dtype, self.autocast):
            # a list or dict (a config file's) is no key: `in` raised TypeError
            if name is not None and (not isinstance(name, str) or name not in DTYPES):
                raise UsageError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
        if self.autocast == "fp32":  # torch.autocast warns and turns itself off for fp32
            raise UsageError("autocast is 'bf16' or 'fp16'; fix: autocast=None for fp32 compute")
        if self.master_dtype not in (None, "fp32"):
            raise UsageError(
                f"master weights are fp32 (master_dtype 'fp32' or None), not {self.master_dtype!r}"
            )
        if self.master_dtype is not None and self.param_dtype == "fp32":
            # `Precision` steps fp32 parameters in place, so the masters were silently none, while
            # `lowbit recipes` printed "fp32 master"
            raise UsageError(
                "master weights are fp32 copies of 16-bit parameters, and param_dtype is 'fp32'; "
                "fix: master_dtype=None, or param_dtype 'bf16' or 'fp16'"
            )
        if self.layer is not None and not isinstance(self.layer, LayerSpec):
            raise UsageError(
                f"layer must be a LayerSpec or None, got {self.layer!r}; fix: e.g. "
                "uniform_layer(OperandSpec('fp8_e4m3')) or a preset's get_recipe(name).layer"
            )
        overrides = self.overrides
        if not isinstance(overrides, (tuple, list)):
            raise UsageError(
                f"overrides must be a tuple of Override values, got {overrides!r}; fix: e.g. "
                "(parse_override('lm_head=keep', recipe),)"
            )
        # the wrong item alone: the whole tuple, a preset's own overrides included, ran to 800
        # characters around a 'lm_head=keep'
        wrong = next((o for o in overrides if not isinstance(o, Override)), None)
        if wrong is not None:
            text = wrong if isinstance(wrong, str) else "lm_head=keep"
            raise UsageError(
                f"an override must be an Override, got {wrong!r}; fix: e.g. "
                f"recipe.with_overrides({text!r}) or parse_override({text!r}, recipe)"
            )
        object.__setattr__(self, "overrides", tuple(overrides))
        interval = self.loss_scale_growth_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UsageError(
                f"loss scale growth interval must be at least 1 (a whole number of steps), got "
                f"{interval}; fix: e.g. 2000 (GradScaler's)"
            )
        if self.update_rounding is not UpdateRounding.NEAREST and self.param_dtype == "fp32":
            raise UsageError("stochastic/Kahan update rounding needs 16-bit parameters")
        scale = self.initial_loss_scale
        # the scale is an fp32 tensor; a string (a config's "65536") failed in the comparison
        # at least fp32's smallest normal, whose reciprocal (the unscale) is finite: the loss
        # scaler's floor (`lowbit.precision.scaler`); checked here too, so that `lowbit compare`
        # refuses it before the study's first run, not at its first fp16 run
        tiny = torch.finfo(torch.float32).tiny
        if isinstance(scale, bool) or not isinstance(scale, Real) or not tiny <= scale <= _FP32_MAX:
            raise UsageError(
                f"loss scale must be a positive fp32 number (at least 2^-126, {tiny:.4g}, and "
                f"at most {_FP32_MAX:.3g}), got {scale!r}; fix: e.g. 65536 (2^16, GradScaler's "
                "start)"
            )
        if self.master_dtype is not None and self.update_rounding is UpdateRounding.KAHAN:
            raise UsageError("Kahan compensation replaces master weights; use one or the other")
        self._check_fp16_emulation()

    def _check_fp16_emulation(self) -> None:
        """fp16 emulation stands for fp16 compute: on a CPU autocast is off and the layer's fp16
        operands do the GEMMs, on a GPU fp16 autocast does and the layer is dropped. With another
        compute dtype or other operands (``replace(fp16-mixed, layer=fp8...)``, ``replace(
        bf16-mixed, emulate_fp16_gemms_on_cpu=True)``) a CPU computed in fp32 or fp8 without
        autocast and a GPU without the fp8 GEMMs, each without a word."""
        emulate = self.emulate_fp16_gemms_on_cpu
        if not isinstance(emulate, bool):  # a string "no" was true
            raise UsageError(f"emulate_fp16_gemms_on_cpu is True or False, got {emulate!r}")
        fp16_compute = (self.autocast or self.param_dtype) == "fp16"
        # no layer: the GPU's own copy (`Precision.convert`), fp16 autocast doing the GEMMs
        fp16_layer = self.layer is None or all(
            spec.format == "fp16" for spec in self.layer.operands().values()
        )
        if emulate and not (fp16_compute and fp16_layer):
            raise UsageError(
                "emulate_fp16_gemms_on_cpu stands for fp16 compute: it needs autocast 'fp16' (or "
                "fp16 params without autocast) and a layer of fp16 operands, which a GPU drops for "
                "fp16 autocast; fix: emulate_fp16_gemms_on_cpu=False"
            )

    def layer_for(self, name: str) -> tuple[LayerSpec | None, str]:
        """The layer spec for the module called ``name`` and why (first matching override wins,
        operand by operand).

        An ``OPERAND:FORMAT`` override changes the named operands of the layer as it is without
        the override: the layer the later matching overrides give (a whole-layer one, or other
        operands' ``OPERAND:FORMAT`` ones), else the recipe's. So a `lowbit doctor` suggestion
        added beside a user's own operand override for the same layer changes both operands,
        and where two name one operand the earlier one wins (the first deciding the whole layer
        dropped the later one's operands, and the suggestion was made again). A layer the recipe
        keeps computes in the recipe's compute dtype, so its other operands stay there (as
        under a recipe that converts no layers), and an override that changes none of them
        leaves it kept. (`parse_override` builds the override's layer from the recipe's
        converted operands; used as it is, ``*=grad_weight.grad_out:bf16`` under fp8-tensorwise
        put the output head it keeps in fp8.)"""
        return self._decide(name, self.overrides)[:2]

    def fixed_operands(self, name: str) -> frozenset[str]:
        """The operands of module ``name`` whose spec an override sets: every operand for a
        whole-layer override, the named ones for an ``OPERAND:FORMAT`` one (every operand of a
        layer the recipe keeps: the others stay in the compute dtype), none without one."""
        return self._decide(name, self.overrides)[2]

    def deciding_overrides(self, name: str) -> tuple[Override, ...]:
        """The overrides that decide an operand of module ``name`` (`layer_for`: first match
        wins, operand by operand), also where they change nothing (an operand of a kept layer
        set to the compute dtype it has): every override matching ``name`` but those whose
        operands (a whole-layer one's: all six) earlier matching ones decided already. `convert`
        warns of the user's overrides that decide no layer (a misspelt or shadowed pattern)."""
        every = frozenset(LayerSpec().operands())
        decided: frozenset[str] = frozenset()
        found = []
        for override in filter(lambda o: o.matches(name), self.overrides):
            whole = not override.operands or override.layer is None
            named = every if whole else frozenset(override.operands)
            if named - decided:
                found.append(override)
            decided |= named
        return tuple(found)

    def _decide(
        self, name: str, overrides: Sequence[Override]
    ) -> tuple[LayerSpec | None, str, frozenset[str]]:
        """`layer_for` and `fixed_operands` of module ``name`` under ``overrides``."""
        every = frozenset(LayerSpec().operands())
        for index, override in enumerate(overrides):
            if not override.matches(name):
                continue
            if not override.operands or override.layer is None:
                return override.layer, override.reason, every
            later, reason, fixed = self._decide(name, overrides[index + 1 :])
            named = {operand: override.layer.operands()[operand] for operand in override.operands}
            if later is not None:
                # the reasons of every override that set an operand (`_shared_reason` shows them)
                why = (
                    override.reason if reason == RECIPE_DEFAULT else f"{override.reason}; {reason}"
                )
                return later.with_operands(named), why, fixed | frozenset(override.operands)
            compute = uniform_layer(OperandSpec(self.autocast or self.param_dtype))
            layer = compute.with_operands(named)
            return (None, reason, every) if layer == compute else (layer, override.reason, every)
        if self.layer is None:
            return None, "the recipe converts no layers", frozenset()
        return self.layer, RECIPE_DEFAULT, frozenset()

    @property
    def compute_layer(self) -> LayerSpec:
        """What the recipe's GEMMs compute with: its layer spec, or for a recipe that converts no
        layers, every operand in its compute dtype (autocast's, else the parameters')."""
        if self.layer is not None:
            return self.layer
        return uniform_layer(OperandSpec(self.autocast or self.param_dtype))

    def resolved_for(
        self, names: Iterable[str], layers: Sequence[str] = (), heads: Sequence[str] = ()
    ) -> Recipe:
        """A copy whose override placeholders (``{last}``, `LAST_BLOCK`, `OUTSIDE_BLOCKS`,
        `OUTPUT_HEAD`) are resolved against a model's module names, its GEMM ``layers`` and its
        output ``heads`` (`Override.resolve`; `convert` calls this, so one recipe serves models of
        any depth)."""
        names = list(names)
        overrides = tuple(override.resolve(names, layers, heads) for override in self.overrides)
        return self if overrides == self.overrides else replace(self, overrides=overrides)

    def with_overrides(self, *overrides: Override | str) -> Recipe:
        """A copy whose new overrides take precedence over the existing ones; a string is
        ``PATTERN=WHAT`` as ``lowbit train --override`` takes it (`parse_override` against this
        recipe)."""
        from lowbit.recipes.presets import parse_override  # presets builds on this module

        parsed = (parse_override(o, self) if isinstance(o, str) else o for o in overrides)
        return replace(self, overrides=tuple(parsed) + self.overrides)

    @property
    def low_precision_formats(self) -> list[str]:
        if self.layer is None:
            return []
        names = {spec.format for spec in self.layer.operands().values()}
        return sorted(n for n in names if isinstance(get(n), FloatFormat) and n not in DTYPES)
