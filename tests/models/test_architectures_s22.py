"""Hugging Face architectures beyond Llama, GPT-2 and BERT, through lowbit's public functions:
tiny random configs built here (no downloads)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.infer import prune_model
from lowbit.memory import estimate, measure_activations

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY["intermediate_size"] = 64
TINY["max_position_embeddings"] = 64
# ModernBERT's special ids default to 50280-50283: inside a 64-token vocabulary here
MODERNBERT_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MODERNBERT_IDS |= {"cls_token_id": 1, "sep_token_id": 2}


def _config(config_class: str, **fields):
    import transformers

    return getattr(transformers, config_class)(vocab_size=64, **TINY, **fields)


@pytest.mark.parametrize(
    ("config_class", "task"),
    [("ModernBertDecoderConfig", "causal-lm"), ("ModernBertConfig", "token-classification")],
)
def test_estimate_builds_models_whose_initialization_reads_values(config_class, task):
    """ModernBERT initializes with torch's trunc_normal_, which reads values (``mask.any()``)
    that the estimator's fake tensors do not have: `lowbit estimate` was a traceback, and so was
    `lowbit train`, at the memory report of its first step."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from lowbit.models.pretrained import with_sdpa

    config = _config(config_class, **MODERNBERT_IDS)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForTokenClassification
    torch.manual_seed(0)
    model = with_sdpa(lambda **kw: auto.from_config(copy.deepcopy(config), **kw)).train()
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    # a tagger's batch: padded sentences with their attention mask (the trainer's)
    mask = {} if task == "causal-lm" else {"attention_mask": (ids > 8).long()}

    def forward():
        logits = model(input_ids=ids, **mask).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten() % logits.shape[-1])

    saved = measure_activations(model, forward)
    estimated = estimate(config, "fp32", "fp32", batch=2, seq=16, task=task)
    assert estimated.num_params == sum(p.numel() for p in model.parameters())
    assert estimated.parameters == 4 * estimated.num_params
    assert estimated.activations == pytest.approx(saved.activations, rel=1e-3)


@pytest.mark.parametrize(
    ("config_class", "fields", "head"),
    [
        ("BioGptConfig", {}, "output_projection"),
        ("GPTNeoXJapaneseConfig", {"intermediate_multiple_size": 2}, "embed_out"),
    ],
)
def test_pruning_keeps_an_output_head_of_any_name_dense(config_class, fields, head):
    """The output head was found by its name (lm_head, classifier, head): BioGPT's and
    GPT-NeoX-Japanese's were pruned, and with them, tied to it, half the input embedding."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(config_class, **fields))
    embedding = model.get_input_embeddings().weight.detach().clone()
    head_weight = getattr(model, head).weight.detach().clone()
    report = prune_model(model, sparsity=0.5)
    assert report.kept == {head: "output head kept dense"}
    assert torch.equal(getattr(model, head).weight, head_weight)
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert report.changed  # the other linear layers are pruned
    assert all(text == "50.0% zeros" for text in report.changed.values())


@pytest.mark.parametrize(
    ("config_class", "fields"),
    [("GPTJConfig", {"rotary_dim": 8}), ("GPT2Config", {}), ("PhiConfig", {})],
)
@pytest.mark.parametrize("target", ["int8", "int4"])
def test_a_quantized_model_computes_the_logits_of_its_export(config_class, fields, target):
    """A quantized layer added its bias after the GEMM, and the dense layer that `lowbit export`
    writes adds it inside (addmm), which rounds otherwise: the logits of a quantized folder and
    of its export differed in their last bits (1.6e-7 on a GPT-J), with any trained bias."""
    import transformers

    from lowbit.infer import QuantRecipe, dequantize_model, quantize_model
    from lowbit.infer.quant import Target

    names = {"GPTJConfig": ("n_embd", "n_layer", "n_head"), "GPT2Config": ("n_embd", "n_layer")}
    names["GPT2Config"] += ("n_head",)
    keys = names.get(config_class, ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    shape = dict(zip(keys, (64, 1, 4), strict=True))
    if config_class == "PhiConfig":
        shape["intermediate_size"] = 256
    config = getattr(transformers, config_class)(vocab_size=64, **shape, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for name, bias in model.named_parameters():  # initialized to zeros: trained ones are not
        if name.endswith("bias"):
            torch.nn.init.normal_(bias)
    quantize_model(model, QuantRecipe(Target(target)))
    exported = copy.deepcopy(model)
    dequantize_model(exported)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, exported(input_ids=ids).logits)
