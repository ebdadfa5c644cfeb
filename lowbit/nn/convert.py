"""Swapping GEMM layers for their low-precision versions, in place.

A post-order walk over the module tree: each linear layer (`lowbit.nn.layer_kinds`: `nn.Linear`,
Falcon's, transformers' ``Conv1D`` of GPT-2), `nn.Conv2d` and `nn.ConvTranspose2d` (any groups) whose
fully qualified name the recipe assigns a layer spec is replaced by a `LowbitLinear`/`LowbitConv1D`/
`LowbitConv2d`/`LowbitConvTranspose2d` that holds the
*same* Parameter objects (optimizers and tied weights keep working), and each mixture-of-experts
module of 3-D expert weights by a `LowbitExperts` (every expert's GEMMs converted). Every other
such layer is kept, with the reason recorded, and so is every other module that computes a GEMM
lowbit does not convert (other convolutions, subclasses of `nn.Linear`, `nn.MultiheadAttention`:
one layer with its ``out_proj``; mixture-of-experts routers that compute their logits with their
own weight, `is_router`; experts modules of 3-D weights in a layout of their own,
`other_experts_layout`), so nothing is left out of the report. A layer converted before
is left as it is when the recipe gives it the same spec (converting twice with one recipe is
harmless) and refused otherwise: its original layer is gone, so another recipe needs the
unconverted model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import weakref
from dataclasses import dataclass, field

import torch

from lowbit.errors import UsageError
from lowbit.nn.conv import LowbitConv2d, LowbitConvTranspose2d, depthwise_kept_reason
from lowbit.nn.experts import GEMM_KINDS, LowbitExperts, is_experts, other_experts_layout
from lowbit.nn.layer_kinds import (
    is_conv1d,
    is_linear,
    is_router,
    is_router_module,
    weight_read_by_parent,
)
from lowbit.nn.linear import LowbitConv1D, LowbitLinear, LowbitModule
from lowbit.recipes import Recipe, get_recipe
from lowbit.recipes.auto import check_plannable
from lowbit.recipes.presets import KEEP_CLASSIFIERS, KEEP_ROUTERS, OTHER_ROUTER_KEPT, ROUTER_KEPT
from lowbit.recipes.recipe import Override, block_of, block_stacks, names_pattern

# the GEMM layers `convert` swaps (and a mixture-of-experts layer's weights), as reports name them
_CONVERTED_KINDS = "nn.Linear, nn.Conv2d, nn.ConvTranspose2d, transformers' Conv1D"


@dataclass
class ConversionReport:
    converted: dict[str, str] = field(default_factory=dict)  # name -> spec description
    kept: dict[str, str] = field(default_factory=dict)  # name -> reason
    unused_overrides: list[str] = field(default_factory=list)  # user overrides no layer took
    # an unused override's text -> the module other than a GEMM layer it names (`summary`)
    unused_hints: dict[str, str] = field(default_factory=dict)
    # an unused override's text -> the overrides before it that decide its layer's operands
    shadowed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    searched: bool = False  # whether `convert` walked a model (a recipe may convert no layer)

    def __getattr__(self, name: str):
        """A module's attribute asked of the report: ``model = lowbit.convert(model, recipe)``
        kept the report in place of the model, and ``model.parameters()`` failed with "object has
        no attribute" and no word of why. Still an AttributeError (``hasattr`` answers False)."""
        if name.startswith("_") or not hasattr(torch.nn.Module, name):
            raise AttributeError(f"'ConversionReport' object has no attribute {name!r}")
        raise AttributeError(
            f"a ConversionReport has no .{name}(): lowbit.convert(model, recipe) converts the model "
            "in place and returns this report of it; fix: call lowbit.convert(model, recipe) "
            "without assigning it to model (or model = precision.convert(model))"
        )

    @property
    def kept_every_layer(self) -> bool:
        """GEMM layers were found and every one was kept (nvfp4's end blocks on a 2-block
        model): `lowbit train` warns of it (`Precision.keeps_every_layer`), the estimate notes it."""
        return bool(self.kept) and not self.converted

    def unused_override_line(self, text: str) -> str:
        """That override ``text`` applies to no layer, and what it names instead (`summary`, and
        `lowbit train`'s warning under ``--quiet``, which said only the first half)."""
        hint = self.unused_hints.get(text, "lowbit doctor lists the names")
        return f"override {text} applies to no layer ({hint})"

    def __str__(self) -> str:  # print(report): the summary, not the dataclass's one-line dicts
        return self.summary()

    def summary(self) -> str:
        """``converted N/M layers`` and why the rest were kept; where there were no layers, why:
        "converted 0/0 layers" read as if every layer had been left out."""
        total = len(self.converted) + len(self.kept)
        if not total:
            first = (
                f"no GEMM layer found (lowbit converts {_CONVERTED_KINDS} and mixture-of-experts "
                "weights): nothing converted"
                if self.searched
                else "no layer converted: the recipe computes its GEMMs in its compute dtype, as "
                "PyTorch does (under autocast or in the parameters' dtype)"
            )
        else:
            first = f"converted {len(self.converted)}/{total} layers"
        lines = [first]
        lines += [f"  {self.unused_override_line(text)}" for text in self.unused_overrides]
        for reason, names, shown in self._kept_by_reason():
            lines.append(f"  kept {len(names)}: {reason}: {shown}")
        return "\n".join(lines)

    def kept_line(self, dtype: str) -> str:
        """One line of the layers kept, grouped by reason (a few names each, then a count), for
        `lowbit train`'s start-up: ``converted 28/29 layers; kept in bf16: lm_head (output head
        kept in high precision)``. ``dtype``: what the kept layers compute in."""
        total = len(self.converted) + len(self.kept)
        groups = [
            (shown if len(names) == 1 else f"{len(names)} layers, {shown}") + f" ({reason})"
            for reason, names, shown in self._kept_by_reason()
        ]
        return f"converted {len(self.converted)}/{total} layers; kept in {dtype}: " + "; ".join(
            groups
        )

    def _kept_by_reason(self) -> list[tuple[str, list[str], str]]:
        """``(reason, names, shown)`` per reason a layer was kept, in the order first met;
        ``shown``: the first 4 names and how many more."""
        reasons: dict[str, list[str]] = {}
        for name, reason in self.kept.items():
            reasons.setdefault(reason, []).append(name)
        groups = []
        for reason, names in reasons.items():
            more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
            groups.append((reason, names, ", ".join(names[:4]) + more))
        return groups


_log = logging.getLogger(__name__)

# Modules that compute GEMMs; those not converted below are reported as kept (`_kept_gemm_reason`).
_GEMM_MODULES = (
    torch.nn.Linear,
    torch.nn.Bilinear,
    torch.nn.modules.conv._ConvNd,
    torch.nn.MultiheadAttention,
)


def _kept_gemm_reason(module: torch.nn.Module) -> str | None:
    """Why a GEMM module of a kind lowbit does not convert is kept; None for other modules."""
    if not isinstance(module, _GEMM_MODULES):
        layout = other_experts_layout(module)
        return f"{layout}: not converted" if layout else None
    kind = type(module).__name__
    if torch.nn.utils.parametrize.is_parametrized(module):  # a class made for it: Parametrized...
        names = ", ".join(module.parametrizations)
        return f"its weight is computed by a parametrization ({names}): not converted"
    if isinstance(module, torch.nn.MultiheadAttention):
        return (
            f"{kind} is not converted (its projections, out_proj included, compute inside "
            f"F.multi_head_attention_forward)"
        )
    for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d):
        if isinstance(module, base):
            return f"{kind} subclasses nn.{base.__name__} and may compute otherwise: not converted"
    return f"{kind} is not converted (lowbit converts {_CONVERTED_KINDS})"


def _refuse_uninitialized(recipe: Recipe, model: torch.nn.Module) -> None:
    """Refuse, before any layer is swapped, a lazy GEMM layer (``nn.LazyLinear``,
    ``nn.LazyConv2d``) that the recipe converts but whose shape its first forward has not set yet:
    kept, it would turn into a plain layer at that forward and compute in high precision for good,
    unnoticed."""
    for name, layer in unwrapped_modules(model):
        lazy = isinstance(layer, torch.nn.modules.lazy.LazyModuleMixin)
        unset = lazy and isinstance(layer, _GEMM_MODULES) and layer.has_uninitialized_params()
        if unset and recipe.layer_for(name)[0] is not None:
            raise UsageError(
                f"{name} is a {type(layer).__name__} whose shape is not set yet, so it cannot be "
                f"converted; fix: run one forward pass (model(example_input)) before convert"
            )


def _computed_weight_reason(layer: torch.nn.Module) -> str | None:
    """Why a linear layer or Conv2d whose GEMM does not read its own trained weight and bias is
    kept, or None. ``weight_norm``, ``spectral_norm`` and pruning recompute ``weight`` in a forward
    pre-hook from other Parameters and buffers (``weight_g``/``weight_v``, ``weight_orig``,
    ``weight_mask``), and accelerate's offloading replaces ``forward``: a swapped layer would drop
    those tensors from the model and compute with a stale weight."""
    others = [n for n in layer._parameters if n not in ("weight", "bias")] + list(layer._buffers)
    if others or not isinstance(layer.weight, torch.nn.Parameter):
        shown = f" ({', '.join(others)})" if others else ""
        return f"its weight is computed by a hook from other tensors{shown}: not converted"
    if "forward" in vars(layer):
        return "its forward is replaced on the instance (an offloading hook): not converted"
    return None


# Where a module keeps its hooks (`torch.nn.Module.__init__`): a swapped layer takes them over.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _move_hooks(layer: torch.nn.Module, replacement: torch.nn.Module) -> None:
    """Hooks registered on ``layer`` run on ``replacement``: the same dicts, so that the handles
    that registered them still remove them."""
    for attr in _HOOK_DICTS:
        if attr in vars(layer):
            setattr(replacement, attr, getattr(layer, attr))
    replacement._is_full_backward_hook = layer._is_full_backward_hook


def is_convertible(module: torch.nn.Module) -> bool:
    """A GEMM module `convert` swaps when the recipe gives it a spec."""
    return (
        is_experts(module)
        or is_linear(module)
        or type(module) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    )


def wrapped_attribute(module: torch.nn.Module) -> str | None:
    """The attribute under which ``module`` holds the model it wraps, where it is one of torch's
    wrappers whose part of a name inside it is none of the model's own: `torch.compile`'s
    ``OptimizedModule`` (``_orig_mod``), ``DistributedDataParallel`` and ``DataParallel``
    (``module``); None for any other module (FSDP2's ``fully_shard`` adds no module)."""
    if isinstance(module, _PARALLEL_WRAPPERS):
        return "module"
    return "_orig_mod" if isinstance(module, _wrapper_types()) else None


def _wrapper_types() -> tuple[type, ...]:
    """The classes of `wrapped_attribute`'s wrappers (dynamo's not imported: its import is slow,
    and a compiled module has imported it)."""
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    return _PARALLEL_WRAPPERS if compiled is None else (*_PARALLEL_WRAPPERS, compiled)


_PARALLEL_WRAPPERS = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``model``'s wrappers (`wrapped_attribute`), or ``model``."""
    while (inner := wrapped_attribute(model)) is not None:
        model = model._modules[inner]
    return model


def unwrapped_modules(
    model: torch.nn.Module, remove_duplicate: bool = True
) -> list[tuple[str, torch.nn.Module]]:
    """``model.named_modules()`` as the unwrapped model names them: without torch's wrappers
    (`wrapped_attribute`) and their parts of the names, at any depth (``module.0`` of
    ``DDP(model)``, ``0._orig_mod`` of ``model[0] = torch.compile(model[0])``: ``0``). Overrides,
    reports and precision states name layers so: the names ``lowbit train --override`` takes
    (the trainer converts before wrapping), and a state saved inside a wrapper loads outside it.
    A module of the model's own named ``module`` or ``_orig_mod`` keeps its name."""
    named = list(model.named_modules(remove_duplicate=remove_duplicate))
    types = _wrapper_types()
    wrappers = {name: wrapped_attribute(m) for name, m in named if isinstance(m, types)}
    if not wrappers:
        return named  # the common case: one pass of named_modules and a type check per module
    return [(_unwrapped_name(name, wrappers), m) for name, m in named if name not in wrappers]


def unwrapped_tensors(
    model: torch.nn.Module, buffers: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` (and with ``buffers`` its ``named_buffers()`` after them) as
    the unwrapped model names them (`unwrapped_modules`): ``0.weight`` of ``DDP(model)``, not
    ``module.0.weight``, as error messages name them. A tensor shared by several modules is
    listed once, at its first place."""
    named, seen = [], set()
    for kind in ("parameters", "buffers")[: 1 + buffers]:
        for prefix, module in unwrapped_modules(model):
            for name, tensor in getattr(module, f"named_{kind}")(recurse=False):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    named.append((f"{prefix}.{name}" if prefix else name, tensor))
    return named


def _unwrapped_name(name: str, wrappers: dict[str, str]) -> str:
    """``name`` without the parts that ``wrappers`` (a wrapper's name -> the attribute it holds
    its model under) add."""
    parts = name.split(".") if name else []
    return ".".join(
        part for i, part in enumerate(parts) if wrappers.get(".".join(parts[:i])) != part
    )


# every layer `convert` swapped in, in any model, held weakly (`layers_holding`)
_swapped_in: weakref.WeakSet = weakref.WeakSet()


def _child_name(prefix: str, child_name: str, wrapped: str | None) -> str:
    """The unwrapped name of the child ``child_name`` of the module named ``prefix``, which wraps
    its child ``wrapped`` (`wrapped_attribute`)."""
    if child_name == wrapped:
        return prefix
    return f"{prefix}.{child_name}" if prefix else child_name


def _swap(module: torch.nn.Module, child_name: str, replacement: torch.nn.Module) -> None:
    """Put ``replacement`` in ``module``'s child ``child_name``. A compiled layer's wrapper
    (``model[0] = torch.compile(model[0])`` before `convert`) bound its forward to the layer it
    wrapped: it computed the original layer in high precision without a word, the converted one
    unused, until its forward is bound again (`OptimizedModule._initialize`, which its
    constructor calls). Every layer swapped in is listed (`layers_holding`)."""
    setattr(module, child_name, replacement)
    if isinstance(replacement, (LowbitModule, LowbitExperts)):
        _swapped_in.add(replacement)
    if child_name == "_orig_mod" and wrapped_attribute(module) == "_orig_mod":
        module._initialize()


def gemm_layer_names(model: torch.nn.Module) -> list[str]:
    """The names of the model's convertible GEMM modules, in module order."""
    return [name for name, module in unwrapped_modules(model) if is_convertible(module)]


def output_head_names(model: torch.nn.Module) -> list[str]:
    """The names of the GEMM modules that the model (or a model inside it, a wrapped one) returns
    from transformers' ``get_output_embeddings()``: its output head, whatever its name."""
    heads = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            with contextlib.suppress(NotImplementedError, AttributeError):  # a class without one
                heads.add(id(getter()))
    places = unwrapped_modules(model, remove_duplicate=False)  # each place of a shared head
    return [name for name, module in places if id(module) in heads and name]


def router_layer_names(model: torch.nn.Module, mixture_of_experts: bool = True) -> list[str]:
    """The names of the GEMM modules inside the model's router modules (`is_router_module`),
    whatever their names: those of mixture-of-experts layers, beside an experts module (Switch
    Transformers' ``router.classifier``, Zaya's ``router_mlp.fc1``, Ergo's ``gate.linear``), or
    with ``mixture_of_experts=False`` those of other routers (GraniteDocling's
    ``density_router``, which chooses a path for each sample)."""
    modules = dict(unwrapped_modules(model))
    routers = [
        f"{name}."
        for name, module in modules.items()
        if is_router_module(module)
        and mixture_of_experts
        == any("expert" in sibling for sibling in modules[name.rpartition(".")[0]]._modules)
    ]
    return [
        name
        for name, module in unwrapped_modules(model)
        if name.startswith(tuple(routers)) and _is_gemm(module)
    ]


def router_overrides(model: torch.nn.Module) -> list[Override]:
    """The overrides that keep ``model``'s router layers in high precision, the one rule that
    training's presets (`recipe_for_model`) and ``lowbit quantize`` (`lowbit.infer.quantize_model`)
    share: `KEEP_ROUTERS` (routers that are plain linear layers, by name) with the layers inside
    the model's mixture-of-experts router modules added (`router_layer_names`), then, if it has
    any, the layers of its other routers, kept with `OTHER_ROUTER_KEPT` (names glob-escaped,
    `names_pattern`)."""
    kept = KEEP_ROUTERS
    if names := router_layer_names(model):
        pattern = f"{KEEP_ROUTERS.pattern}|{names_pattern(names)}"
        kept = dataclasses.replace(KEEP_ROUTERS, pattern=pattern)
    if names := router_layer_names(model, False):
        return [kept, Override(names_pattern(names), None, OTHER_ROUTER_KEPT)]
    return [kept]


def _is_gemm(module: torch.nn.Module) -> bool:
    """A GEMM module: one `convert` swaps, one it swapped before, or one it keeps."""
    return is_convertible(module) or isinstance(
        module, (*_GEMM_MODULES, LowbitModule, LowbitExperts)
    )


def _transformers_models(model: torch.nn.Module) -> list[str]:
    """The names (with a trailing dot) of the transformers models in ``model``, itself included."""
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", ())
    return [
        f"{name}." if name else ""
        for name, module in unwrapped_modules(model)
        if isinstance(module, pretrained)
    ]


def cnn_classifier_names(model: torch.nn.Module) -> list[str]:
    """The final classifier of an image network, found by its place, not its name (torchvision's
    ResNet ``fc``, the PyTorch tutorial CNN's ``fc2``): the model's last GEMM module in module
    order, when the model holds an ``nn.Conv2d``, that last module is a linear layer, and it lies
    in no stack of blocks (an ``fc2`` inside a block is a hidden layer) and in no transformers
    model (whose heads the presets know by name: CLIP's last layer is its ``text_projection``).
    A plain MLP has no such head: its last layer is not told from a hidden one."""
    gemms = [(name, module) for name, module in unwrapped_modules(model) if _is_gemm(module)]
    if not any(isinstance(module, (torch.nn.Conv2d, LowbitConv2d)) for _, module in gemms):
        return []
    name, last = gemms[-1]
    stacks = block_stacks(name for name, _ in unwrapped_modules(model))
    inside_transformers = name.startswith(tuple(_transformers_models(model)))
    if not is_linear(last) or block_of(name, stacks) is not None or inside_transformers:
        return []
    return [name]


def recipe_for_model(recipe: Recipe | str, model: torch.nn.Module) -> Recipe:
    """``recipe`` with its override placeholders resolved against ``model``
    (`Recipe.resolved_for`: its module names, GEMM layers and output head), and with the layers
    that the presets' `KEEP_ROUTERS` and `KEEP_CLASSIFIERS` cannot name by pattern added to them
    (`router_overrides`, `cnn_classifier_names`)."""
    recipe = get_recipe(recipe)
    overrides = list(recipe.overrides)
    if KEEP_ROUTERS in overrides:
        at = overrides.index(KEEP_ROUTERS)
        overrides[at : at + 1] = router_overrides(model)
    if KEEP_CLASSIFIERS in overrides and (names := cnn_classifier_names(model)):
        pattern = f"{KEEP_CLASSIFIERS.pattern}|{names_pattern(names)}"
        overrides[overrides.index(KEEP_CLASSIFIERS)] = dataclasses.replace(
            KEEP_CLASSIFIERS, pattern=pattern
        )
    if overrides != list(recipe.overrides):
        recipe = dataclasses.replace(recipe, overrides=tuple(overrides))
    return recipe.resolved_for(
        (name for name, _ in unwrapped_modules(model)),
        gemm_layer_names(model),
        output_head_names(model),
    )


def check_model(model, call: str) -> None:
    """Refuse, in one line, a ``model`` that is not a module (a list of layers, a state dict, a
    pipeline); ``call`` names the function given it (``convert``, ``precision.convert``)."""
    if isinstance(model, ConversionReport):
        raise UsageError(
            f"{call} got a ConversionReport, which lowbit.convert(model, recipe) returns after "
            "converting the model in place; fix: keep the model (lowbit.convert(model, recipe) "
            "without assigning it to model) and pass that"
        )
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"{call} swaps the GEMM layers of a torch.nn.Module, got a {type(model).__name__}; "
            "fix: pass the model itself (e.g. a pipeline's .model, or torch.nn.Sequential(*layers) "
            "for a list of them)"
        )


def convert(
    model: torch.nn.Module, recipe: Recipe | str, report: ConversionReport | None = None
) -> ConversionReport:
    """Swap the model's GEMM layers for low-precision ones as ``recipe`` says; returns the report
    of which were converted and which kept and why, also logged (logger ``lowbit.nn.convert``,
    level INFO)."""
    check_model(model, "convert")
    layer = unwrapped(model)  # a compiled layer is a bare layer too
    if is_convertible(layer) or isinstance(layer, (LowbitModule, LowbitExperts)):
        raise UsageError(
            f"convert swaps the GEMM layers inside a model, in place, and a bare "
            f"{type(layer).__name__} has no parent to be swapped in; fix: convert a model that "
            f"holds it, e.g. torch.nn.Sequential(layer)"
        )
    if isinstance(getattr(recipe, "recipe", None), Recipe):  # a lowbit.Precision (not imported:
        # it imports this module); get_recipe listed every preset's name as the fix
        raise UsageError(
            "lowbit.convert(model, recipe) takes a recipe (its name or a Recipe), not a "
            f"{type(recipe).__name__}; fix: model = precision.convert(model), which also casts "
            "the model to the recipe's parameter dtype and keeps the report"
        )
    recipe = recipe_for_model(recipe, model)
    check_plannable(
        recipe, (n for n, m in unwrapped_modules(model) if is_convertible(m) or is_experts(m))
    )
    _refuse_uninitialized(recipe, model)
    report = report if report is not None else ConversionReport()
    report.searched = True
    # Each module visited, by id: (the module, what took its place: a replacement or itself). A
    # module may sit at several places (one layer applied twice, `Sequential(lin, act, lin)`);
    # ``named_children`` lists it once, so its later places would keep the original layer and
    # compute in high precision. Every place gets one decision, one module (`_shared_reason`).
    # (The module is held so that its id cannot pass to a new object during the walk.)
    placed: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
    places: dict[int, list[str]] = {}
    for place, module in unwrapped_modules(model, remove_duplicate=False):
        places.setdefault(id(module), []).append(place)

    def decision(name: str, child: torch.nn.Module) -> tuple:
        """The spec (None: kept) and reason for the module ``child`` first found at ``name``."""
        return _shared_reason(recipe, places[id(child)]) or recipe.layer_for(name)

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) in placed:
                _swap(module, child_name, placed[id(child)][1])
                continue
            placed[id(child)] = (child, child)
            name = _child_name(prefix, child_name, wrapped_attribute(module))
            if isinstance(module, torch.nn.MultiheadAttention) and child_name == "out_proj":
                continue  # a part of the attention (reported as one kept layer), not a layer
            if isinstance(child, (LowbitModule, LowbitExperts)):
                _converted_before(recipe, name, child, report)
                continue
            visit(child, name)
            if is_experts(child):  # a mixture-of-experts layer's 3-D expert weights
                spec, reason = decision(name, child)
                if spec is None:
                    report.kept[name] = reason
                    continue
                gemm_specs = _expert_gemm_overrides(recipe, name, spec, child.num_experts)
                replacement = LowbitExperts(child, spec, gemm_specs=gemm_specs)
                for kind in GEMM_KINDS:
                    for expert, gemm in enumerate(replacement.gemms[kind]):
                        # the operands an override of this GEMM (else of the whole module) sets
                        own = recipe.fixed_operands(f"{name}.gemms.{kind}.{expert}")
                        gemm.lowbit_state.fixed_operands = own or recipe.fixed_operands(name)
                _move_hooks(child, replacement)
                _swap(module, child_name, replacement)
                placed[id(child)] = (child, replacement)
                report.converted[name] = f"{spec.describe()} ({child.num_experts} experts)"
                continue
            if not is_convertible(child):  # exact types
                if is_router(child):
                    report.kept[name] = ROUTER_KEPT
                elif (kept := _kept_gemm_reason(child)) is not None:
                    # a layer the recipe keeps on purpose (a router's, a head) is kept for that
                    report.kept[name] = _kept_on_purpose(recipe, name) or kept
                continue
            spec, reason = decision(name, child)
            if spec is None:
                report.kept[name] = reason
                continue
            unsupported = _computed_weight_reason(child) or depthwise_kept_reason(child)
            if unsupported is None and (reader := weight_read_by_parent(module, child_name)):
                unsupported = (
                    f"{reader} multiplies by its weight itself, never calling the layer: "
                    "not converted"
                )
            if unsupported:
                report.kept[name] = unsupported
                continue
            if isinstance(child, torch.nn.Conv2d):
                replacement = LowbitConv2d(child, spec)
            elif isinstance(child, torch.nn.ConvTranspose2d):
                replacement = LowbitConvTranspose2d(child, spec)
            elif is_conv1d(child):
                replacement = LowbitConv1D(child, spec)
            else:
                replacement = LowbitLinear(child, spec)
            # The operands an override set keep their spec: the auto controller plans the others.
            replacement.lowbit_state.fixed_operands = recipe.fixed_operands(name)
            _move_hooks(child, replacement)
            _swap(module, child_name, replacement)
            placed[id(child)] = (child, replacement)
            report.converted[name] = spec.describe()

    visit(model, "")
    unused = _unused_overrides(recipe, model)
    report.unused_overrides += unused
    report.unused_hints.update(_unused_hints(recipe, model, unused, report.shadowed))
    _log.info("convert, recipe %s: %s", recipe.name, report.summary())
    return report


def _kept_on_purpose(recipe: Recipe, name: str) -> str | None:
    """The reason of the override that keeps layer ``name`` (a preset's router or head, the
    user's ``PATTERN=keep``), or None: the recipe's own reason for a layer that lowbit does not
    convert anyway (Ergo's router and output head subclass ``nn.Linear``)."""
    spec, reason = recipe.layer_for(name)
    keeps = spec is None and any(override.matches(name) for override in recipe.overrides)
    return reason if keeps else None


def _shared_reason(recipe: Recipe, places: list[str]) -> tuple[None, str] | None:
    """``(None, reason)`` for a module that sits at several ``places`` (a layer tied or reused
    between the body and a head the recipe keeps) which the recipe decides differently: one
    module computes one way, so it is kept at all of them, whichever place comes first in the
    model (the body's decision would quantize the head); None where the places agree."""
    decisions = [recipe.layer_for(place) for place in places]
    if all(spec == decisions[0][0] for spec, _ in decisions):
        return None
    shown = "; ".join(
        f"{place}: {reason if spec is None else f'converted ({reason})'}"
        for place, (spec, reason) in zip(places, decisions)
    )
    return None, f"one module at places the recipe decides differently, kept at all ({shown})"


def _unused_overrides(recipe: Recipe, model: torch.nn.Module) -> list[str]:
    """The user's overrides (``--override``, `parse_override`) that decide no GEMM layer of the
    model (a misspelt name, or one an earlier override shadows), as the user wrote them."""
    names = []
    for name, module in unwrapped_modules(model, remove_duplicate=False):  # every place of a module
        if isinstance(module, (LowbitModule, LowbitExperts)) or is_convertible(module):
            names.append(name)
        elif _kept_gemm_reason(module) is not None and _kept_on_purpose(recipe, name):
            names.append(name)  # a layer lowbit does not convert, kept by the override
        if isinstance(module, LowbitExperts):  # its expert GEMMs, which overrides may name
            names += [
                f"{name}.gemms.{kind}.{e}" for kind in GEMM_KINDS for e in range(module.num_experts)
            ]
    # the overrides that decide an operand of a layer (`Recipe.deciding_overrides`), also where
    # they change nothing (an operand of a kept layer set to the compute dtype it has): not a
    # misspelt name
    deciding = {id(o) for name in names for o in recipe.deciding_overrides(name)}
    return [
        override.reason.removeprefix("override ")
        for override in recipe.overrides
        if override.reason.startswith("override ") and id(override) not in deciding
    ]


def _kept_reason_of_kind(module: torch.nn.Module) -> str | None:
    """Why a GEMM layer that `convert` never swaps is kept (`_kept_gemm_reason`); None for the
    others, a layer it swaps or swapped included."""
    if is_convertible(module) or isinstance(module, (LowbitModule, LowbitExperts)):
        return None
    return _kept_gemm_reason(module)


def _unused_hints(
    recipe: Recipe, model: torch.nn.Module, unused: list[str], shadowed: dict
) -> dict[str, str]:
    """For each ``unused`` override that names a module of the model other than a converted GEMM
    layer, what it names: a GEMM layer lowbit keeps (``nn.Conv1d``, ``nn.Conv3d``) with
    the reason, a GEMM layer whose operands earlier overrides decide (``0=keep`` then
    ``0=mxfp8``, which was called no GEMM layer), a module that holds GEMM layers (``model.layers.0.mlp=keep``: a pattern matches
    whole names, not the layers inside) with the pattern that names them, or one that computes no
    GEMM (``model.norm=fp32``). The bare "applies to no layer" read as a misspelt name, and a
    kept GEMM layer was called no GEMM layer, its ``NAME.*`` offered, which names nothing.
    The earlier overrides of a GEMM layer go into ``shadowed`` (`ConversionReport.shadowed`)."""
    hints = {}
    for override in recipe.overrides:
        text = override.reason.removeprefix("override ")
        if text not in unused or text in hints:
            continue
        matched = [(n, m) for n, m in unwrapped_modules(model) if n and override.matches(n)]
        kept = next(((n, r) for n, m in matched if (r := _kept_reason_of_kind(m))), None)
        layer = next((n for n, m in matched if _is_gemm(m)), None)
        # every operand this one sets of that layer is decided by an override before it
        deciding = recipe.deciding_overrides(layer) if layer else ()
        first = ", ".join(o.reason for o in deciding)
        holder = next(((n, m) for n, m in matched if any(map(_is_gemm, m.modules()))), None)
        if kept:
            hints[text] = f"{kept[0]}: {kept[1]}"
        elif first:
            shadowed[text] = tuple(o.reason.removeprefix("override ") for o in deciding)
            hints[text] = (
                f"{layer} takes {first} first: the first override to name an operand decides it"
            )
        elif holder:
            name, kind = holder[0], type(holder[1]).__name__
            hints[text] = f"{name} ({kind}) is no GEMM layer: {name}.* names its layers"
        elif matched:
            name, kind = matched[0][0], type(matched[0][1]).__name__
            hints[text] = f"{name} ({kind}) computes no GEMM: not converted anyway"
        elif wrapped := _wrapped_name_matched(override, model):
            bare = wrapped[1] or "the model itself"
            hints[text] = (
                f"overrides name the layers as the unwrapped model does, without the module. and "
                f"_orig_mod. parts torch's wrappers add: name {wrapped[0]} as {bare}"
            )
    return hints


def _wrapped_name_matched(override, model: torch.nn.Module) -> tuple[str, str] | None:
    """The first module whose name with its wrappers' parts (``module.2`` of ``DDP(model)``,
    ``_orig_mod.2`` of ``torch.compile(model)``) ``override`` matches, and its unwrapped name
    (`unwrapped_modules`), or None: such overrides named layers before lowbit's session 43, and
    name none since."""
    named = list(model.named_modules())
    wrappers = {name: inner for name, m in named if (inner := wrapped_attribute(m)) is not None}
    for name, _ in named:
        bare = _unwrapped_name(name, wrappers)
        if name and name != bare and name not in wrappers and override.matches(name):
            return name, bare
    return None


def _converted_before(recipe: Recipe, name: str, layer, report: ConversionReport) -> None:
    """A layer an earlier `convert` swapped: reported as converted when ``recipe`` gives it the
    same spec, refused otherwise (its original layer is gone)."""
    spec, _ = recipe.layer_for(name)
    if spec != layer.spec:
        wanted = "keeps it" if spec is None else f"gives it {spec.describe()}"
        raise UsageError(
            f"{name} is converted already ({layer.spec.describe()}) and recipe {recipe.name} "
            f"{wanted}; fix: convert the original, unconverted model (a model converts once)"
        )
    report.converted[name] = spec.describe()


def _expert_gemm_overrides(recipe: Recipe, name: str, spec, experts: int) -> dict:
    """Specs other than the module's ``spec`` that overrides give single expert GEMMs of the
    experts module ``name`` (by their names, ``<name>.gemms.<kind>.<expert>``, as `lowbit doctor`
    reports them), by (kind, expert)."""
    out = {}
    for kind in GEMM_KINDS:
        for expert in range(experts):
            gemm = f"{name}.gemms.{kind}.{expert}"
            if not any(override.matches(gemm) for override in recipe.overrides):
                continue  # the module's spec (a recipe that converts no layer says so by None)
            gemm_spec, _ = recipe.layer_for(gemm)
            if gemm_spec == spec:
                continue
            if gemm_spec is None:
                raise UsageError(
                    f"override keeps {gemm}, one GEMM of a mixture-of-experts layer; fix: keep "
                    f"the whole layer ({name}=keep) or give the GEMM a format instead"
                )
            out[kind, expert] = gemm_spec
    return out


def layers_holding(param_ids: set[int]) -> list[torch.nn.Module]:
    """The layers `convert` swapped in, in any model, that hold a parameter of ``param_ids``: a
    `Precision` finds those of the models it was not given (`Precision._warn_converted_elsewhere`)."""
    return [
        layer for layer in list(_swapped_in) if any(id(p) in param_ids for p in layer.parameters())
    ]


def swapped_layers(model: torch.nn.Module) -> set[str]:
    """The names of the modules `convert` put in the model (converted layers, experts modules
    and their GEMMs): what `replaced_by_plain_layers` compares the model against."""
    return {
        name
        for name, module in unwrapped_modules(model)
        if isinstance(module, (LowbitModule, LowbitExperts))
    }


def replaced_by_plain_layers(model: torch.nn.Module, swapped: set[str]) -> list[str]:
    """The names in ``swapped`` (`swapped_layers` at the last `convert`) at which the model now
    holds a layer of a kind `convert` swaps, unconverted: transformers' ``resize_token_embeddings``
    builds a new ``nn.Linear`` output head of an untied model, which computes in the compute
    dtype, not the recipe's format. A wrapper in a converted layer's place (a LoRA layer holding
    it as its ``base_layer``) is no such layer."""
    replaced = []
    modules = dict(unwrapped_modules(model))
    for name in sorted(swapped):
        now = modules.get(name)  # None: removed, or a part of an experts module replaced whole
        if now is None:
            continue
        if is_convertible(now) and not isinstance(now, (LowbitModule, LowbitExperts)):
            replaced.append(name)
    return replaced


def session_42_layer_names(model: torch.nn.Module) -> dict[str, str]:
    """Every converted layer's unwrapped name (`lowbit_layers`) by the name a precision state of
    lowbit's session 42 (``layer_names: "uncompiled"``) or older gave it: without compiled
    wrappers' ``_orig_mod`` parts but with ``DistributedDataParallel``'s and ``DataParallel``'s
    ``module`` ones (``module.0`` of ``DDP(model)``: ``0``). Only names that differ are listed;
    for a model in no such wrapper and with no layer of its own under a ``module``, the names
    its layers had inside one (a run saved inside DDP, resumed in a single process)."""
    named = list(model.named_modules())
    every = {name: inner for name, m in named if (inner := wrapped_attribute(m)) is not None}
    compiled = {name: inner for name, inner in every.items() if inner == "_orig_mod"}
    layers = [name for name, m in named if isinstance(m, LowbitModule)]
    pairs = [(_unwrapped_name(name, compiled), _unwrapped_name(name, every)) for name in layers]
    renamed = {old: new for old, new in pairs if old != new}
    if not renamed and all(new.split(".")[0] != "module" for _, new in pairs):
        renamed = {f"module.{new}": new for _, new in pairs}
    return renamed


def lowbit_layers(model: torch.nn.Module) -> dict[str, LowbitModule]:
    """Every converted layer by fully qualified name, as the unwrapped model names it
    (`unwrapped_modules`)."""
    return {
        name: module
        for name, module in unwrapped_modules(model)
        if isinstance(module, LowbitModule)
    }
