"""Post-training quantization of one weight matrix: what is stored, and how it is read back.

A linear layer's weight ``w`` (N out-features x K in-features) is quantized along K, the axis its
GEMM contracts, by `lowbit.formats.quantize` (the same quantizer the training recipes use), and the
result is stored in the narrowest honest encoding, so the checkpoint's size reduction is real:

=========  ==========================  =====================================  ===================
format     element                     scale (per row, or per group of K)     stored element
=========  ==========================  =====================================  ===================
int8       symmetric int8, -127..127   fp32 ``amax / 127``                    int8
int4       symmetric int4, -7..7       fp32 ``amax / 7``, groups (default 32)  2 per byte (uint8)
fp8        fp8 e4m3 (OCP)              fp32 ``amax / 448``                    float8_e4m3fn
mxfp4      fp4 e2m1                    e8m0 (uint8), blocks of 32 (OCP MX)    2 per byte (uint8)
nvfp4      fp4 e2m1                    e4m3 per 16 + one fp32 per tensor      2 per byte (uint8)
=========  ==========================  =====================================  ===================

Rows whose K is not a multiple of the group are zero-padded to whole groups only when allowed
(``pad_groups``; always for MX/NVFP4, whose blocks the format fixes): zeros do not change a
group's amax, so the real elements quantize as in a full group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from lowbit.errors import UsageError
from lowbit.formats import Granularity, QTensor, ScaleRule, quantize
from lowbit.formats import get as get_format
from lowbit.infer.packing import (
    codes_to_fp4,
    codes_to_int4,
    fp4_to_codes,
    int4_to_codes,
    pack_nibbles,
    unpack_nibbles,
)


class Target(str, Enum):
    """A post-training quantization format (``lowbit quantize --to``)."""

    INT8 = "int8"
    INT4 = "int4"
    FP8 = "fp8"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


class Mode(str, Enum):
    WEIGHTS_ONLY = "weights-only"
    WEIGHTS_AND_ACTIVATIONS = "weights-and-activations"


# element format, granularity without groups, default group, fixed group (None: free)
_TABLE = {
    Target.INT8: ("int8", Granularity.AXIS, None, None),
    Target.INT4: ("int4", Granularity.BLOCK, 32, None),
    Target.FP8: ("fp8_e4m3", Granularity.AXIS, None, None),
    Target.MXFP4: ("fp4_e2m1", Granularity.MX, 32, 32),  # OCP MX v1.0: k = 32
    Target.NVFP4: ("fp4_e2m1", Granularity.NVFP4, 16, 16),  # NVFP4: 16 elements per e4m3 scale
}


def targets() -> list[str]:
    return [t.value for t in Target]


@dataclass(frozen=True)
class QuantRecipe:
    """What `lowbit quantize` does to every linear layer: format, mode and group size."""

    format: Target
    mode: Mode = Mode.WEIGHTS_ONLY
    group_size: int | None = None  # None: the format's default (per row for int8/fp8)
    pad_groups: bool | None = None  # None: pad only when the group is the format's default

    def __post_init__(self):
        try:
            object.__setattr__(self, "format", Target(self.format))
        except ValueError:
            name = str(self.format)
            known = name in _FORMAT_NAMES
            raise UsageError(
                f"{name!r} is {'a lowbit number format but ' if known else ''}not a quantization "
                f"target; fix: use --to {' | '.join(targets())}"
            ) from None
        object.__setattr__(self, "mode", Mode(self.mode))
        fixed = _TABLE[self.format][3]
        if self.group_size is not None:
            if self.group_size < 1:
                raise UsageError(f"--group-size {self.group_size} must be positive; fix: raise it")
            if fixed is not None and self.group_size != fixed:
                raise UsageError(
                    f"{self.format.value} uses blocks of {fixed} by its spec; fix: drop "
                    f"--group-size or pass --group-size {fixed}"
                )

    @property
    def element(self) -> str:
        return _TABLE[self.format][0]

    @property
    def group(self) -> int | None:
        """Elements of K per scale; None means one scale per row."""
        return self.group_size if self.group_size is not None else _TABLE[self.format][2]

    @property
    def pads(self) -> bool:
        """Whether each row's last group is zero-padded where the group size does not divide
        K; never with one scale per row, which has no group to pad (quantization.json said
        ``"pad_groups": true`` of an int8 folder, ``"group_size": null``)."""
        if self.group is None:
            return False
        if self.pad_groups is not None:
            return self.pad_groups
        return self.group_size is None or _TABLE[self.format][3] is not None

    @property
    def granularity(self) -> Granularity:
        base = _TABLE[self.format][1]
        if base is Granularity.AXIS and self.group is not None:
            return Granularity.BLOCK
        return base

    @property
    def packed(self) -> bool:
        """Two 4-bit codes per byte."""
        return self.format in (Target.INT4, Target.MXFP4, Target.NVFP4)

    def describe(self) -> str:
        group = f"groups of {self.group}" if self.group else "one scale per row"
        return f"{self.format.value} {self.mode.value}, {group}"

    def to_dict(self) -> dict:
        return {
            "format": self.format.value,
            "mode": self.mode.value,
            "group_size": self.group,
            "pad_groups": self.pads,
            "element": self.element,
            "granularity": self.granularity.value,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantRecipe:
        return cls(
            Target(data["format"]), Mode(data["mode"]), data["group_size"], data["pad_groups"]
        )


_FORMAT_NAMES = {"fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3"}
_FORMAT_NAMES |= {"fp4_e2m1", "e8m0", "fp6", "int2", "fp4"}


def check_divides(recipe: QuantRecipe, in_features: dict[str, int]) -> None:
    """A `UsageError` when the group does not divide every layer's in-features (``in_features``:
    by layer name) and padding was not asked for; it suggests the group sizes that divide all of
    them, so that the fix does not fail on the next layer."""
    group = recipe.group
    if group is None or recipe.pads:
        return
    failing = [(name, k) for name, k in in_features.items() if k % group]
    if not failing:
        return
    name, k = failing[0]
    more = f" (and {len(failing) - 1} more layers)" if len(failing) > 1 else ""
    divisors = common_divisors(in_features)
    raise UsageError(
        f"--group-size {group} does not divide the {k} in-features of {name}{more}; fix: use a "
        f"group size that divides every layer's ({', '.join(map(str, divisors)) or 'none'}) or "
        "add --pad-groups to zero-pad each row's last group"
    )


def common_divisors(in_features: dict[str, int]) -> list[int]:
    """The first six sizes from 2 up to 256 that divide every layer's in-features (by layer
    name): the group sizes (`check_divides`), or the M of N:M pruning patterns, that fit them
    all."""
    common = math.gcd(*in_features.values())
    return [d for d in range(2, min(common, 256) + 1) if common % d == 0][:6]


def stored_shapes(
    n: int, k: int, recipe: QuantRecipe
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors a quantized (N x K) weight is stored as."""
    groups = 1 if recipe.group is None else math.ceil(k / recipe.group)
    value_shape = (n, math.ceil(k / 2)) if recipe.packed else (n, k)
    value_dtype = {
        Target.INT8: torch.int8,
        Target.FP8: torch.float8_e4m3fn,
    }.get(recipe.format, torch.uint8)
    scale_dtype = {
        Target.MXFP4: torch.uint8,  # e8m0 code: exponent + 127
        Target.NVFP4: torch.float8_e4m3fn,
    }.get(recipe.format, torch.float32)
    out = {"qweight": (value_shape, value_dtype), "scale": ((n, groups), scale_dtype)}
    if recipe.format is Target.NVFP4:
        out["tensor_scale"] = ((1,), torch.float32)
    return out


@torch.no_grad()
def quantize_weight(w: torch.Tensor, recipe: QuantRecipe) -> dict[str, torch.Tensor]:
    """The stored tensors (see `stored_shapes`) of an N x K weight."""
    q = quantize(
        w.detach().float(),
        recipe.element,
        recipe.granularity,
        axis=-1,
        block_size=recipe.group if recipe.granularity is Granularity.BLOCK else None,
        pad=True,
    )
    if recipe.format is Target.INT8:
        values = q.values
    elif recipe.format is Target.INT4:
        values = pack_nibbles(int4_to_codes(q.values))
    elif recipe.format is Target.FP8:
        values = q.values.to(torch.float8_e4m3fn)  # the bf16 carrier holds e4m3 values exactly
    else:
        values = pack_nibbles(fp4_to_codes(q.values))
    out = {"qweight": values.contiguous(), "scale": q.scale.contiguous()}
    if recipe.format is Target.MXFP4:
        exponent = torch.log2(q.scale)  # MX scales are 2**e, e in [-127, 127]
        out["scale"] = (exponent.round() + 127).to(torch.uint8)
    if recipe.format is Target.NVFP4:
        out["scale"] = q.scale.to(torch.float8_e4m3fn)  # e4m3-valued by construction
        out["tensor_scale"] = q.tensor_scale.reshape(1).float()
    return out


def weight_qtensor(stored: dict[str, torch.Tensor], k: int, recipe: QuantRecipe) -> QTensor:
    """The stored tensors as a `QTensor` (carrier values + fp32 scales) for the emulated GEMMs."""
    qweight = stored["qweight"]
    if recipe.format is Target.INT8:
        values = qweight
    elif recipe.format is Target.INT4:
        values = codes_to_int4(unpack_nibbles(qweight, k))
    elif recipe.format is Target.FP8:
        values = qweight.to(torch.bfloat16)
    else:
        values = codes_to_fp4(unpack_nibbles(qweight, k), torch.bfloat16)
    scale = stored["scale"]
    if recipe.format is Target.MXFP4:
        scale = torch.exp2(scale.float() - 127)
    else:
        scale = scale.float()
    group = recipe.group
    return QTensor(
        values=values,
        scale=scale,
        fmt=get_format(recipe.element),
        granularity=recipe.granularity,
        block=(1, group if group is not None else k),
        axis=1,
        tensor_scale=stored.get("tensor_scale") if recipe.format is Target.NVFP4 else None,
        scale_rule=(
            None
            if recipe.format is Target.NVFP4
            else ScaleRule.MX_FLOOR
            if recipe.format is Target.MXFP4
            else ScaleRule.AMAX
        ),
    )


def quantize_activation(x: torch.Tensor, recipe: QuantRecipe) -> QTensor:
    """Dynamic quantization of M x K activations along K: per token, or per token and group."""
    return quantize(
        x.float(),
        recipe.element,
        recipe.granularity,
        axis=-1,
        block_size=recipe.group if recipe.granularity is Granularity.BLOCK else None,
        pad=True,
    )


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(x, "int8", "axis")`` of M x K ``x`` as (int8 values, M x 1 fp32 scale): one fused
    pass on CPU (`lowbit.kernels`)."""
    q = quantize(x, "int8", Granularity.AXIS, axis=-1)
    return q.values, q.scale
