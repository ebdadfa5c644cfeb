"""`lowbit quantize` of a mixture-of-experts layer whose class wraps transformers' experts dispatch
in a forward of its own (Ergo's ``ErgoExperts``), and its export to dense weights."""

import copy

import pytest
import torch

from lowbit.infer import QuantRecipe, dequantize_model, quantize_model
from lowbit.infer.experts import QuantExperts
from tests.nn.test_experts_edges_s31 import ergo


def _experts_and_routing():
    """Ergo's experts module beside a linear layer (`quantize_model` wants one), and a top-2
    routing of 12 tokens."""
    experts = ergo().model.layers[1].mlp.experts
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(32, 32), "experts": experts})
    g = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(12, 32, generator=g)
    top_k_weights, top_k_index = torch.randn(12, 4, generator=g).softmax(-1).topk(2, dim=-1)
    return model, (hidden_states, top_k_index, top_k_weights)


def test_quantized_experts_with_a_forward_of_their_own_equal_their_export():
    """Quantized, the experts skipped each expert's norm (and the row per route): the quantized
    model's outputs were not those of the exported (dequantized) one that transformers runs."""
    model, routing = _experts_and_routing()
    quantize_model(model, QuantRecipe("int8"))
    assert isinstance(model["experts"], QuantExperts)
    exported = copy.deepcopy(model)
    dequantize_model(exported)
    assert type(exported["experts"]).__name__ == "ErgoExperts"
    with torch.no_grad():
        quantized, dense = model["experts"](*routing), exported["experts"](*routing)
    torch.testing.assert_close(quantized, dense, rtol=0, atol=1e-5)


def test_a_quantized_checkpoint_holds_the_experts_norm():
    """The expert norm, applied by the class's own forward, is saved with the quantized
    matrices: a quantized folder loaded into a fresh model would have lost its trained values."""
    model, _ = _experts_and_routing()
    norm = model["experts"].post_expert_norm.weight.detach().clone()
    quantize_model(model, QuantRecipe("int8"))
    assert torch.equal(model.state_dict()["experts.post_expert_norm.weight"], norm)


def test_a_quantized_model_that_reads_a_layers_weight_runs():
    """Ergo's decoder layer reads ``self_attn.o_proj.weight.dtype`` in its forward: a quantized
    layer had no ``weight``, and `lowbit eval`/`generate` of a quantized Ergo folder failed with
    an AttributeError."""
    from tests.nn.test_experts_edges_s31 import IDS

    model = ergo().eval()
    with torch.no_grad():
        reference = model(IDS).logits
    quantize_model(model, QuantRecipe("int8"))
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.weight.dtype == torch.float32 and o_proj.weight.shape == (32, 32)
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.shape == reference.shape and torch.isfinite(logits).all()


def test_tying_a_quantized_layers_weight_is_one_line():
    """With a ``weight`` property, transformers' ``tie_weights`` on a quantized head failed with
    a KeyError ("attribute 'weight' already exists"); before it, the embedding was registered
    beside the quantized weight, unused."""
    from lowbit.errors import UsageError

    model = torch.nn.ModuleDict({"head": torch.nn.Linear(8, 4), "embed": torch.nn.Embedding(4, 8)})
    quantize_model(model, QuantRecipe("int8"))
    with pytest.raises(UsageError, match="fix: tie or resize the model's embeddings before"):
        model["head"].weight = model["embed"].weight
