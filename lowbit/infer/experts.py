"""`QuantExperts`: a mixture-of-experts layer whose expert matrices are stored quantized.

transformers keeps a layer's experts as 3-D Parameters (`lowbit.nn.experts`); quantized, each
expert's up and down projection becomes its own `QuantLinear` (``up.<e>``, ``down.<e>``: one scale
per row or group, as for any linear layer), and tokens are routed as in training
(`lowbit.nn.experts.route`). `dense` writes the dequantized matrices back into the original module
(3-D, in its own layout), which is how `lowbit export` hands a quantized MoE model to transformers.
"""

from __future__ import annotations

import torch

from lowbit.infer.modules import QuantLinear
from lowbit.infer.quant import QuantRecipe
from lowbit.nn.experts import (
    GEMM_KINDS,
    dispatch_config,
    expert_matrices,
    has_own_forward,
    matrix_name,
    replacement_forward,
    route,
)


def expert_linears(experts: torch.nn.Module, kind: str) -> list[torch.nn.Linear]:
    """Each expert's ``kind`` projection as an ``nn.Linear`` (out x in) whose weight and bias are
    views of the 3-D Parameters, no copy (as `lowbit.nn.layer_kinds.as_linear` views a Conv1D)."""
    out = []
    for w, b in expert_matrices(experts, kind):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        linear.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
        if b is not None:
            linear.bias = torch.nn.Parameter(b.detach(), requires_grad=False)
        out.append(linear)
    return out


class QuantExperts(torch.nn.Module):
    """Drop-in for a transformers experts module, every expert projection a `QuantLinear`."""

    def __init__(self, experts: torch.nn.Module, recipe: QuantRecipe, shell: bool = False):
        """``shell``: empty `QuantLinear`s, to load a quantized checkpoint's tensors into."""
        super().__init__()
        self.num_experts = experts.num_experts
        self.has_gate = experts.has_gate
        # The original module computes the gate (`_apply_gate`) and the activation, and takes the
        # dequantized matrices back (`dense`); held outside the module tree, so that its dense
        # Parameters are not saved with the quantized ones.
        self.__dict__["experts"] = experts
        self.__dict__["dispatch_config"] = (
            dispatch_config(experts) if has_own_forward(experts) else None
        )
        self.has_post_expert_norm = getattr(experts, "has_post_expert_norm", False)
        # Registered whenever the module has one, so that a quantized checkpoint saves it: Ergo's
        # per-expert norm is applied by its class's own forward, not by `route`.
        if getattr(experts, "post_expert_norm", None) is not None:
            self.post_expert_norm = experts.post_expert_norm
        for kind in GEMM_KINDS:
            layers = []
            for linear in expert_linears(experts, kind):
                if shell:
                    layer = QuantLinear(
                        linear.in_features, linear.out_features, recipe, linear.bias is not None
                    )
                else:
                    layer = QuantLinear.from_linear(linear, recipe)
                layers.append(layer.to(experts.down_proj.device))
            setattr(self, kind, torch.nn.ModuleList(layers))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return replacement_forward(self, hidden_states, top_k_index, top_k_weights)

    def routed(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The quantized experts on routed rows (what transformers' experts dispatch computes)."""

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            h = self.up[e](rows)
            h = self.experts._apply_gate(h) if self.has_gate else self.experts.act_fn(h)
            return self.down[e](h)

        norm = self.post_expert_norm if self.has_post_expert_norm else None
        return route(hidden_states, top_k_index, top_k_weights, self.num_experts, expert, norm)

    def dense(self) -> torch.nn.Module:
        """The original experts module holding the dequantized matrices (fp32, its layout)."""
        experts = self.experts
        with torch.no_grad():
            for kind in GEMM_KINDS:
                name = matrix_name(experts, kind)
                weights = torch.stack([q.dequantized_weight() for q in getattr(self, kind)])
                if experts.is_transposed:
                    weights = weights.transpose(1, 2)
                getattr(experts, name).data = weights.contiguous()
                if experts.has_bias:
                    bias = torch.stack([q.bias.detach() for q in getattr(self, kind)])
                    getattr(experts, f"{name}_bias").data = bias
        return experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.up[0].recipe.describe()}"
