"""Mixture-of-experts layers: every expert's GEMMs in low precision.

transformers (5 and later) stores a mixture-of-experts layer's experts as 3-D Parameters, one
matrix per expert (``gate_up_proj``/``up_proj`` and ``down_proj``, optionally transposed and with
biases), in classes made by its ``use_experts_implementation`` decorator, which also records the
layout (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``). There is no
``nn.Linear`` to swap, so `LowbitExperts` replaces the whole module: it routes each token to its
top-k experts as transformers' grouped implementation does (tokens sorted by expert), and runs
each expert's up and down projection as its own low-precision layer (`LowbitExpertGemm`, the
three GEMMs of `lowbit.nn.linear`), each operand quantized per expert, as fp8 MoE training
quantizes each expert's GEMM (DeepSeek-V3, Transformer Engine's grouped GEMMs). The Parameters
are the original ones under their original names, so checkpoints and optimizers are unchanged.
A class that wraps the dispatch in a forward of its own (Ergo's) runs that forward, its dispatch
answered by lowbit's routing (`own_forward`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lowbit.errors import UsageError
from lowbit.nn.linear import LayerState, LowbitModule, full_precision, lowbit_linear
from lowbit.nn.operand import scale_agreement
from lowbit.recipes.recipe import LayerSpec

# What the decorator sets on an experts module, and which of its Parameters the GEMMs read.
_LAYOUT = ("num_experts", "has_gate", "has_bias", "is_transposed")
_OPTIONAL = ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias", "post_expert_norm")
# Each expert's two projections; one expert's GEMM is named `<experts>.gemms.<kind>.<expert>`.
GEMM_KINDS = ("up", "down")


def matrix_name(experts: torch.nn.Module, kind: str) -> str:
    """The 3-D Parameter of an experts module that holds every expert's ``kind`` matrix."""
    if kind == "down":
        return "down_proj"
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_matrices(experts: torch.nn.Module, kind: str) -> list:
    """Each expert's ``kind`` matrix as an ``nn.Linear`` weight (out x in) with its bias (or
    None): views of the 3-D Parameters, taken with one ``unbind`` each, so that a backward
    through them assembles each 3-D gradient once. ``experts``: a transformers experts module, or
    a module holding its Parameters under the same names (`LowbitExperts`)."""
    name = matrix_name(experts, kind)
    weights = getattr(experts, name).unbind(0)
    if experts.is_transposed:
        weights = [w.t() for w in weights]
    bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
    biases = bias.unbind(0) if bias is not None else [None] * len(weights)
    return list(zip(weights, biases, strict=True))


def is_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module of 3-D expert weights (``use_experts_implementation``)."""
    if not all(hasattr(module, name) for name in _LAYOUT):
        return False
    up = getattr(module, matrix_name(module, "up"), None)
    down = getattr(module, "down_proj", None)
    return all(isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in (up, down))


def other_experts_layout(module: torch.nn.Module) -> str | None:
    """What keeps a mixture-of-experts module that holds its experts' matrices in 3-D Parameters
    of its own layout from being converted (training) or quantized (inference), or None for other
    modules: JetMoE's ``JetMoeParallelExperts`` (one ``weight``, split by expert in its forward)
    and Llama-4's ``Llama4TextExperts`` (a ``bmm`` over every expert) have no
    ``use_experts_implementation`` layout that `LowbitExperts` can route, and no ``nn.Linear``
    inside. They hold most of the model's GEMMs: unreported, they computed in high precision
    under a report that named only the attention layers."""
    if "experts" not in type(module).__name__.lower() or is_experts(module):
        return None
    stacked = [name for name, p in module._parameters.items() if p is not None and p.dim() == 3]
    if not stacked:
        return None
    return (
        f"{type(module).__name__} holds its experts as 3-D Parameters ({', '.join(stacked)}) in a "
        "layout of its own, not transformers' experts interface that lowbit handles"
    )


# The name under which lowbit answers transformers' experts dispatch (`own_forward`).
_DISPATCH = "lowbit"


def _dispatch(experts, hidden_states, top_k_index, top_k_weights):
    """transformers' experts dispatch while `own_forward` runs: the routing it was handed."""
    return experts.__dict__["lowbit_route"](hidden_states, top_k_index, top_k_weights)


def has_own_forward(experts: torch.nn.Module) -> bool:
    """Whether an experts module's class wraps the decorator's dispatch in a forward of its own:
    Ergo's ``ErgoExperts`` gives each (token, expert) row its own row, calls the decorated class's
    forward, then applies each expert's RMSNorm before the weighted sum. Routed by `route` alone,
    the norm and the repetition were skipped: a converted model computed something else, silently
    (the decorator's forward carries ``__wrapped__``, an overriding one does not)."""
    return not hasattr(type(experts).forward, "__wrapped__")


def dispatch_config(experts: torch.nn.Module):
    """A private copy of an experts module's config that names lowbit's implementation for
    transformers' experts dispatch (a copy: the model's config, and the original module that
    `lowbit export` hands back, keep theirs)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(_DISPATCH, _dispatch)
    config = copy.deepcopy(experts.config)
    config._experts_implementation = _DISPATCH
    return config


def own_forward(experts, config, routed, hidden_states, top_k_index, top_k_weights):
    """``experts``' own forward, its call of the dispatch answered by ``routed`` (same
    arguments): whatever the class does around its experts' GEMMs runs as in transformers."""
    original = experts.config
    experts.config = config
    experts.__dict__["lowbit_route"] = routed
    try:
        return experts.forward(hidden_states, top_k_index, top_k_weights)
    finally:
        experts.config = original
        del experts.__dict__["lowbit_route"]


def replacement_forward(module, hidden_states, top_k_index, top_k_weights):
    """The forward of a module that replaces an experts module (`LowbitExperts`, the quantized
    `lowbit.infer.experts.QuantExperts`): its ``routed`` rows, inside the experts class's own
    forward where it has one (its ``dispatch_config``, `own_forward`)."""
    config = module.dispatch_config
    if config is not None:
        return own_forward(
            module.experts, config, module.routed, hidden_states, top_k_index, top_k_weights
        )
    return module.routed(hidden_states, top_k_index, top_k_weights)


def route(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert,
    norm=None,
    every_expert: bool = False,
) -> torch.Tensor:
    """A mixture-of-experts layer's output, as transformers' grouped implementation computes it:
    the (token, chosen expert) rows sorted by expert, ``expert(e, rows)`` on each expert's rows,
    the optional ``norm`` of every result, weighted by the router, back in token order, summed
    over each token's experts.

    ``every_expert``: also call ``expert`` for an expert no row chose, on one row of zeros (that
    needs a gradient as real rows do), kept in the graph as an empty slice, so that its backward
    runs too: data-parallel ranks route their own tokens but must run the same quantizations, whose
    amaxes they all-reduce (a zero row's amax 0 leaves the agreed maximum as it is; its gradients
    are zero).

    Expert id ``num_experts`` routes a row to no expert: it adds nothing, as in transformers' eager
    and grouped implementations (its expert-parallel sentinel for an expert of another rank)."""
    top_k = top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts + 1).tolist()
    if len(counts) > num_experts + 1:
        raise UsageError(
            f"top_k_index holds expert id {len(counts) - 1}, but the layer has {num_experts} "
            f"experts; fix: route to ids 0..{num_experts - 1} ({num_experts}: to no expert)"
        )
    unrouted = counts.pop()  # the rows sorted last, to no expert
    # A batch that routes no row (an empty one, or every row to no expert): its experts run as
    # idle ones do, so that the (0 x hidden) output comes out of a concatenation of empty slices
    # instead of a concatenation of nothing.
    every_expert = every_expert or not any(counts)
    routed = hidden_states[order // top_k]  # one row per (token, chosen expert), by expert
    outputs = []
    for e, rows in enumerate(routed[: routed.shape[0] - unrouted].split(counts)):
        idle = rows.shape[0] == 0
        if idle and not every_expert:
            continue
        if idle:
            rows = F.pad(rows, (0, 0, 0, 1))  # one zero row, in routed's graph
        out = expert(e, rows)
        outputs.append(out[:0] if idle else out)
    out = torch.cat(outputs)
    if norm is not None:
        out = norm(out)
    out = out * top_k_weights.reshape(-1)[order[: out.shape[0]]].unsqueeze(-1)
    out = F.pad(out, (0, 0, 0, unrouted))  # zero rows for the rows routed to no expert
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    out = out[inverse].view(-1, top_k, out.shape[-1]).sum(dim=1)
    return out.to(hidden_states.dtype)


class LowbitExpertGemm(LowbitModule):
    """One expert's projection inside a `LowbitExperts`: its numerics state only (the weight is a
    slice of the experts' 3-D Parameter, which the parent holds)."""

    def __init__(self, spec: LayerSpec, seed: int = 0, training: bool = True):
        torch.nn.Module.__init__(self)
        self.lowbit_state = LayerState(spec, seed)
        self.train(training)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if self.spec.is_identity:
            return full_precision(F.linear, x, weight, bias)
        return lowbit_linear(x, weight, bias, self.lowbit_state)

    def extra_repr(self) -> str:
        return self.spec.describe()


class LowbitExperts(torch.nn.Module):
    """Drop-in for a transformers experts module, its experts' GEMMs following a `LayerSpec`."""

    def __init__(
        self,
        experts: torch.nn.Module,
        spec: LayerSpec,
        seed: int = 0,
        gemm_specs: dict[tuple[str, int], LayerSpec] | None = None,
    ):
        """``spec`` for every expert GEMM, except those ``gemm_specs`` names by ``(kind,
        expert)``, kind ``up`` or ``down`` (per-GEMM overrides, `lowbit.convert`)."""
        super().__init__()
        for name in (matrix_name(experts, "up"), "down_proj", *_OPTIONAL):
            value = getattr(experts, name, None)
            if value is not None:
                setattr(self, name, value)  # the same Parameters (and norm) under the same names
        for name in _LAYOUT:
            setattr(self, name, getattr(experts, name))
        self.has_post_expert_norm = getattr(experts, "has_post_expert_norm", False)
        # The original module computes the gate (its `_apply_gate`: the activation, and
        # gpt-oss's clamped SwiGLU) and the activation of gateless experts; held outside the
        # module tree so that its Parameters are not registered twice.
        self.__dict__["experts"] = experts
        self.__dict__["dispatch_config"] = (
            dispatch_config(experts) if has_own_forward(experts) else None
        )
        specs = gemm_specs or {}
        self.gemms = torch.nn.ModuleDict(
            {
                kind: torch.nn.ModuleList(
                    LowbitExpertGemm(specs.get((kind, e), spec), seed, experts.training)
                    for e in range(experts.num_experts)
                )
                for kind in GEMM_KINDS
            }
        )

    @property
    def spec(self) -> LayerSpec:
        return self.gemms["up"][0].spec

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return replacement_forward(self, hidden_states, top_k_index, top_k_weights)

    def routed(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts' GEMMs on routed rows (what transformers' experts dispatch computes)."""
        up, down = expert_matrices(self, "up"), expert_matrices(self, "down")

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            h = self.gemms["up"][e](rows, *up[e])
            h = self.experts._apply_gate(h) if self.has_gate else self.experts.act_fn(h)
            return self.gemms["down"][e](h, *down[e])

        # Data-parallel ranks agree on scales by all-reducing amaxes in every quantization
        # (`lowbit.nn.operand.ScaleAgreement`), so each rank runs every expert's GEMMs.
        every_expert = scale_agreement().active
        norm = self.post_expert_norm if self.has_post_expert_norm else None
        return route(
            hidden_states, top_k_index, top_k_weights, self.num_experts, expert, norm, every_expert
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.spec.describe()}"
