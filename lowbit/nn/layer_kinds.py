"""Which modules are linear layers that lowbit converts (training) and quantizes (inference).

By exact type, because a subclass may compute something else (routers, already-quantized layers):
``nn.Linear``; subclasses known to compute exactly ``x @ W.T + b`` (`LINEAR_EQUIVALENTS`); and
transformers' ``Conv1D`` (GPT-2's projections), a linear layer whose weight is stored in x out.
"""

from __future__ import annotations

import sys

import torch

# (module, class) of nn.Linear subclasses whose forward is F.linear's math (Falcon's projections
# compute ``x @ self.weight.T + self.bias``, for a bias-free fast path).
LINEAR_EQUIVALENTS = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


# (module, class) of modules, with the names of their linear layers whose weight they multiply by
# themselves instead of calling the layer: the Mamba mixers' ``time_step = self.dt_proj.weight @
# time_step`` (the bias is added later, inside the selective scan), MobileBERT's masked-LM head's
# one GEMM with ``torch.cat([self.decoder.weight.t(), self.dense.weight])``, NeoMME's masked-LM
# ``hidden_states @ self.unembedding_projection.weight``. Swapped, such a layer
# would be reported converted and never run, its GEMM in high precision. (Falcon-Mamba and Jamba
# call ``dt_proj`` only where ``config._is_quantized`` is set, which other code reads as well.)
WEIGHT_READ_BY_PARENT = {
    ("transformers.models.mobilebert.modeling_mobilebert", "MobileBertLMPredictionHead"): (
        "dense",
        "decoder",
    ),
    ("transformers.models.neomme.modeling_neomme", "NeoMMEForMaskedLM"): (
        "unembedding_projection",
    ),
    ("transformers.models.mamba.modeling_mamba", "MambaMixer"): ("dt_proj",),
    ("transformers.models.falcon_mamba.modeling_falcon_mamba", "FalconMambaMixer"): ("dt_proj",),
    ("transformers.models.jamba.modeling_jamba", "JambaMambaMixer"): ("dt_proj",),
}


def weight_read_by_parent(parent: torch.nn.Module, child_name: str) -> str | None:
    """The name of ``parent``'s class (or of the base class it has it from) when ``parent``
    computes with the weight of its layer ``child_name`` itself (`WEIGHT_READ_BY_PARENT`), else
    None."""
    for kind in type(parent).__mro__:
        if child_name in WEIGHT_READ_BY_PARENT.get((kind.__module__, kind.__name__), ()):
            return kind.__name__
    return None


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class, if transformers has loaded it (no model holds one before)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: torch.nn.Module) -> bool:
    return type(module) is conv1d_type()


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer lowbit swaps: ``nn.Linear``, a `LINEAR_EQUIVALENTS` class, or a Conv1D."""
    kind = type(module)
    return (
        kind is torch.nn.Linear
        or (kind.__module__, kind.__name__) in LINEAR_EQUIVALENTS
        or is_conv1d(module)
    )


def is_router_module(module: torch.nn.Module) -> bool:
    """A mixture-of-experts router, by its class name (transformers' ``...Router``,
    ``...TopKRouter``): one that computes its logits itself (`is_router`), or one with linear
    layers inside (Switch Transformers', NLLB-MoE's and LongCat-Flash's ``router.classifier``,
    Zaya's ``down_proj`` and ``router_mlp``), which are router layers whatever their names."""
    return type(module).__name__.lower().endswith("router")


def is_router(module: torch.nn.Module) -> bool:
    """A mixture-of-experts router that computes its logits itself, with no linear layer inside:
    transformers' ``TopKRouter`` classes (Qwen3-MoE's ``mlp.gate``, Mixtral's, DeepSeek-V3's) call
    ``F.linear`` on their own 2-D ``weight``; Llama-4's router subclasses ``nn.Linear``. Never
    converted (not a linear layer by exact type), it is a GEMM all the same, which the conversion
    report names."""
    weight = module._parameters.get("weight")
    return is_router_module(module) and weight is not None and weight.dim() == 2


def as_linear(layer: torch.nn.Module) -> torch.nn.Linear:
    """``layer`` as an ``nn.Linear`` (out x in weight): itself, or for a ``Conv1D`` a Linear whose
    weight and bias are views of the Conv1D's (no copy: writing into it writes the Conv1D)."""
    if not is_conv1d(layer):
        return layer
    linear = torch.nn.Linear(layer.nx, layer.nf, bias=layer.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(layer.weight.detach().t(), requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
    return linear
