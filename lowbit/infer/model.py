"""Whole-model steps: swap every linear layer for a `QuantLinear` (and every mixture-of-experts
layer for a `QuantExperts`), or prune it by magnitude.

Both walk the module tree post-order and touch linear layers only (`lowbit.nn.layer_kinds`:
``nn.Linear``, Falcon's linear layers, and transformers' ``Conv1D``, GPT-2's projections, whose
weight is stored in x out). Embeddings, norms and convolutions are kept, with the reason reported.
Quantization takes every linear layer, the LM head included, but the routers, kept in high
precision as training's presets keep them (`lowbit.nn.convert.router_overrides`: a rounding would
change where they send tokens); pruning leaves the output head dense
(``PRUNE_SKIP``), as magnitude- and SparseGPT-style pruning of LLMs does: the head's rows are the
vocabulary and pruning it costs the most for the fewest weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import UsageError
from lowbit.infer.experts import QuantExperts, expert_linears
from lowbit.infer.modules import KERNELS, QuantLinear
from lowbit.infer.quant import QuantRecipe, check_divides, common_divisors
from lowbit.nn.convert import output_head_names, router_overrides
from lowbit.nn.experts import GEMM_KINDS, is_experts, matrix_name, other_experts_layout
from lowbit.nn.layer_kinds import as_linear, conv1d_type, is_linear, is_router
from lowbit.recipes.presets import ROUTER_KEPT

# Output layers kept dense by `prune_model`, besides the one transformers' get_output_embeddings()
# returns whatever its name (BioGPT's output_projection, GPT-NeoX-Japanese's embed_out).
PRUNE_SKIP = ("lm_head", "classifier", "head")


@dataclass
class LayerReport:
    changed: dict[str, str] = field(default_factory=dict)  # name -> what was done
    kept: dict[str, str] = field(default_factory=dict)  # name -> why not

    def summary(self, verb: str) -> str:
        total = len(self.changed) + len(self.kept)
        lines = [f"{verb} {len(self.changed)}/{total} layers"]
        reasons: dict[str, list[str]] = {}
        for name, reason in self.kept.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  kept {len(names)}: {reason}: {shown}")
        return "\n".join(lines)


def _layers(model: torch.nn.Module):
    """(parent, child name, fully qualified name, module) for every submodule, post-order."""
    out = []

    def visit(module, prefix):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            visit(child, name)
            out.append((module, child_name, name, child))

    visit(model, "")
    return out


def quantize_model(model: torch.nn.Module, recipe: QuantRecipe) -> LayerReport:
    """Replace every linear layer but the routers by a `QuantLinear` of ``recipe`` in place;
    checks first."""
    report = LayerReport()
    routers = router_overrides(model)
    linears = []
    for item in _layers(model):
        if not is_linear(item[3]):
            continue
        kept = _router_reason(routers, item[2])
        if kept is None:
            linears.append(item)
        else:
            report.kept[item[2]] = kept
    if not linears:
        raise UsageError(
            f"the model ({type(model).__name__}) has no linear layer to quantize; fix: quantize "
            "a transformer run (causal-lm or token-classification)"
        )
    experts = [item for item in _layers(model) if is_experts(item[3])]
    in_features = {name: as_linear(layer).in_features for _, _, name, layer in linears}
    for _, _, name, layer in experts:
        for kind in GEMM_KINDS:
            in_features[f"{name} ({kind})"] = expert_linears(layer, kind)[0].in_features
    check_divides(recipe, in_features)
    _check_finite(
        [(name, as_linear(layer).weight) for _, _, name, layer in linears]
        + [
            (f"{name} ({kind})", linear.weight)
            for _, _, name, layer in experts
            for kind in GEMM_KINDS
            for linear in expert_linears(layer, kind)
        ]
    )
    for parent, child_name, name, layer in linears:
        quantized = QuantLinear.from_linear(as_linear(layer), recipe)
        quantized.dense_type = type(layer)
        setattr(parent, child_name, quantized)
        report.changed[name] = recipe.describe()
    for parent, child_name, name, layer in experts:
        setattr(parent, child_name, QuantExperts(layer, recipe))
        report.changed[name] = f"{recipe.describe()} ({layer.num_experts} experts)"
    for _, _, name, module in _layers(model):
        if isinstance(module, torch.nn.Conv2d):
            report.kept[name] = "convolutions are not quantized"
        elif isinstance(module, torch.nn.Embedding):
            report.kept[name] = "embedding lookups stay in their dtype"
        elif (layout := other_experts_layout(module)) is not None:
            report.kept[name] = f"{layout}: not quantized"
        elif is_router(module):  # a GEMM with its own weight, not a linear layer
            report.kept[name] = ROUTER_KEPT
    return report


def _check_finite(weights: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse weights holding inf or NaN before any layer changes: no format's scale describes
    them (MXFP4's e2m1 has no code for NaN at all: its packing failed with a traceback), and a
    model that holds them computes NaN whatever it is quantized to."""
    for name, weight in weights:
        if not bool(torch.isfinite(weight).all()):
            raise UsageError(
                f"{name}: its weight holds inf or NaN, which no quantized format stores (the run "
                "diverged?); fix: quantize a run whose checkpoint holds finite weights"
            )


def shell_model(model: torch.nn.Module, recipe: QuantRecipe, names) -> None:
    """Replace the named linear layers by empty `QuantLinear`s (to load stored tensors into)."""
    wanted = set(names)
    for parent, child_name, name, layer in _layers(model):
        if name in wanted and is_experts(layer):
            setattr(parent, child_name, QuantExperts(layer, recipe, shell=True))
            wanted.discard(name)
        elif name in wanted and is_linear(layer):
            linear = as_linear(layer)
            shell = QuantLinear(
                linear.in_features, linear.out_features, recipe, linear.bias is not None
            )
            shell.dense_type = type(layer)
            setattr(parent, child_name, shell.to(layer.weight.device))
            wanted.discard(name)
    if wanted:
        raise UsageError(
            f"the quantized checkpoint names layers the model lacks ({', '.join(sorted(wanted))}); "
            "fix: quantize the run again"
        )


def quant_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_kernel(model: torch.nn.Module, kernel: str) -> None:
    """Weight-only int8 kernel of every layer: ``dequant`` (default) or ``int8pack``."""
    if kernel not in KERNELS:  # a misspelt name would silently keep the default
        raise UsageError(f"unknown kernel {kernel!r}; fix: use {' or '.join(KERNELS)}")
    for layer in quant_layers(model).values():
        layer.kernel = kernel
        layer._cache.clear()


def dequantize_model(model: torch.nn.Module) -> None:
    """Replace every `QuantLinear` by the kind of layer it replaced (``nn.Linear``, Falcon's, or a
    ``Conv1D`` with its weight stored in x out) holding its dequantized fp32 weight, and every
    `QuantExperts` by the experts module it replaced, holding its dequantized matrices."""
    for parent, child_name, _, layer in _layers(model):
        if isinstance(layer, QuantExperts):
            setattr(parent, child_name, layer.dense())
    for parent, child_name, _, layer in _layers(model):
        if isinstance(layer, QuantLinear):
            device = layer.qweight.device
            if layer.dense_type is conv1d_type():  # Conv1D(nf, nx), always with a bias
                dense = layer.dense_type(layer.out_features, layer.in_features)
            else:  # nn.Linear or a subclass with its signature (FalconLinear)
                dense = layer.dense_type(
                    layer.in_features, layer.out_features, bias=layer.bias is not None
                )
            dense = dense.to(device)
            with torch.no_grad():
                as_linear(dense).weight.copy_(layer.dequantized_weight())
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            setattr(parent, child_name, dense)


# ------------------------------------------------------------------------------------- pruning


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, pattern=None):
    """Keep-mask of a weight: the largest magnitudes, either ``1 - sparsity`` of the whole matrix
    (unstructured) or ``n`` of every ``m`` consecutive inputs (``pattern=(n, m)``, e.g. 2:4, the
    layout NVIDIA sparse tensor cores accelerate). Ties at the threshold are broken by position."""
    w = weight.detach().float().abs()
    if pattern is not None:
        keep, group = pattern
        rows, k = w.shape
        groups = w.reshape(rows, k // group, group)
        top = groups.topk(keep, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return mask.reshape(rows, k)
    drop = round(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if drop:
        mask[w.flatten().argsort(stable=True)[:drop]] = False
    return mask.reshape(w.shape)


def _router_reason(routers, name: str) -> str | None:
    """Why the layer ``name`` is kept as a router (`router_overrides`, training's rule), or None:
    a zeroed or rounded weight would change where the router sends tokens."""
    return next((router.reason for router in routers if router.matches(name)), None)


def prune_model(model: torch.nn.Module, sparsity: float | None = None, pattern=None) -> LayerReport:
    """Zero the smallest weights of every linear layer but the output head and the routers, in
    place (each expert's matrices of a mixture-of-experts layer as linear layers of their own)."""
    if (sparsity is None) == (pattern is None):
        raise UsageError("give one of --sparsity S or --pattern N:M")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise UsageError(f"--sparsity {sparsity} is outside [0, 1); fix: use e.g. 0.5")
    report = LayerReport()
    # a head tied to the input embedding (BioGPT's) shares its weight: pruning it prunes both
    heads = set(output_head_names(model))
    routers = router_overrides(model)
    linears = []  # (name, [the layer's matrices as linear layers: one, or one per expert GEMM])
    for _, _, name, layer in _layers(model):
        if isinstance(layer, QuantLinear | QuantExperts):
            raise UsageError(
                f"{name} is already quantized; fix: prune the unquantized run, then quantize"
            )
        if is_experts(layer):  # each expert's matrices, views of the 3-D Parameters
            matrices = [m for kind in GEMM_KINDS for m in expert_linears(layer, kind)]
        elif is_linear(layer):
            matrices = [as_linear(layer)]
        else:
            continue
        if (kept := _router_reason(routers, name)) is not None:  # as quantize and training keep
            report.kept[name] = kept  # (Switch's router.classifier read "output head" below)
            continue
        if name.split(".")[-1] in PRUNE_SKIP or name in heads:
            report.kept[name] = "output head kept dense"
            continue
        linears.append((name, matrices))
    if not linears:
        heads = (
            f" besides its output head ({', '.join(report.kept)}, kept dense)"
            if report.kept
            else ""
        )
        raise UsageError(
            f"the model has no linear layer to prune{heads}; fix: prune a transformer run"
        )
    if pattern is not None:
        _check_pattern(pattern, {name: m.in_features for name, ms in linears for m in ms})
    for name, matrices in linears:
        zeros = total = 0
        for matrix in matrices:
            mask = magnitude_mask(matrix.weight, sparsity, pattern)
            matrix.weight.data.mul_(mask.to(matrix.weight.dtype))
            zeros, total = zeros + int((~mask).sum()), total + mask.numel()
        report.changed[name] = f"{zeros / total:.1%} zeros"
    return report


def _check_pattern(pattern: tuple[int, int], in_features: dict[str, int]) -> None:
    """Refuse an N:M pattern whose M does not divide every pruned layer's in-features (by layer
    name): its groups of M consecutive inputs would not tile a row. The fix names the M that fit
    (`common_divisors`) and a pattern of them: it offered --sparsity alone, as if no N:M fit."""
    n, m = pattern
    failing = [(name, k) for name, k in in_features.items() if k % m]
    if not failing:
        return
    name, k = failing[0]
    others = len(failing) - 1
    more = f" (and {others} more layer{'s' * (others > 1)})" if others else ""
    fits = common_divisors(in_features)
    if fits:
        wide = next((d for d in fits if d > n), fits[-1])  # N kept where an M fits it
        example = f"{n}:{wide}" if wide > n else f"{wide // 2}:{wide}"
        shown = ", ".join(map(str, fits))
        fix = (
            f"use an M that divides every pruned layer's in-features ({shown}), e.g. --pattern "
            f"{example}, or --sparsity"
        )
    else:
        fix = "use --sparsity (no M of 2 or more divides every pruned layer's in-features)"
    raise UsageError(
        f"--pattern {n}:{m} needs in-features divisible by {m}, and {name} has {k}{more}; "
        f"fix: {fix}"
    )


def parse_pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--pattern {text!r} is not N:M; fix: use e.g. 2:4") from None
    if not 0 < n < m:
        raise UsageError(f"--pattern {text}: need 0 < N < M; fix: use e.g. 2:4")
    return n, m


def linear_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the model's (unquantized) linear layers, experts' 3-D matrices included."""
    out = []
    for module in model.modules():
        if is_experts(module):
            out += [getattr(module, matrix_name(module, kind)) for kind in GEMM_KINDS]
        elif is_linear(module):
            out.append(module.weight)
    return out


def sparsity_of(model: torch.nn.Module) -> float:
    """Fraction of zeros among the weights of the linear layers (experts' matrices included)."""
    weights = linear_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(sum(w.numel() for w in weights), 1)
