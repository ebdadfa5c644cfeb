"""Mixture-of-experts layers whose class wraps transformers' experts dispatch in a forward of its
own (Ergo's ``ErgoExperts``: a row per (token, expert), each expert's RMSNorm before the weighted
sum), converted by `lowbit.convert`."""

import copy
import dataclasses

import torch

import lowbit
from lowbit.nn.experts import LowbitExperts
from lowbit.recipes import get_recipe
from lowbit.recipes.recipe import OperandSpec, uniform_layer


def ergo():
    """A 2-layer Ergo causal LM (its second layer a mixture of 4 experts, top-2), each expert's
    norm drawn away from ones so that skipping it shows."""
    import transformers

    config = transformers.ErgoConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, first_dense_intermediate_size=48, num_dense_blocks=1,
        moe_intermediate_size=24, shared_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, sliding_window=8, global_attention_every_n_layers=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ErgoForCausalLM(config)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.post_expert_norm.weight.uniform_(0.5, 2.0)
    return model


IDS = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))


def test_experts_with_a_forward_of_their_own_compute_the_original_model_in_fp32():
    """The per-route norm and the row repetition of ``ErgoExperts.forward`` were skipped: routed
    by lowbit alone, an fp32 (identity) conversion changed the logits by 0.3."""
    model = ergo()
    reference = copy.deepcopy(model)
    identity = uniform_layer(OperandSpec("fp32"))
    report = lowbit.convert(
        model, dataclasses.replace(get_recipe("fp8-tensorwise"), layer=identity)
    )
    assert isinstance(model.model.layers[1].mlp.experts, LowbitExperts)
    assert "model.layers.1.mlp.experts" in report.converted
    outputs = [m(input_ids=IDS, labels=IDS) for m in (model, reference)]
    for out in outputs:
        out.loss.backward()
    # within float reassociation: lowbit sums each token's experts in routed order
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=0, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-6, msg=name)
    assert model.config._experts_implementation == reference.config._experts_implementation


def test_experts_with_a_forward_of_their_own_in_low_precision_stay_near_the_model():
    """Each expert's GEMMs in fp8 (current or delayed scaling): the model's logits stay as near
    the fp32 model's as fp8 allows (they were 0.3 away when the expert norm was skipped), the
    expert norm learns, and the delayed-scaling histories of the expert GEMMs record."""
    from lowbit.formats.error import sqnr

    for recipe in ("fp8-tensorwise", "fp8-delayed"):
        model = ergo()
        reference = model(input_ids=IDS).logits.detach()
        precision = lowbit.Precision(recipe)
        precision.convert(model)
        out = model(input_ids=IDS, labels=IDS)
        # every layer of this random model in fp8: 16.7 dB; 3.3 dB with the expert norm skipped
        assert sqnr(reference, out.logits.detach()) > 12, recipe
        precision.backward(out.loss)
        experts = model.model.layers[1].mlp.experts
        assert experts.post_expert_norm.weight.grad.abs().sum() > 0, recipe
    histories = [
        gemm.lowbit_state.histories["forward.x"]
        for kind in ("up", "down")
        for gemm in experts.gemms[kind]
    ]
    assert any(h.pending is not None for h in histories)
