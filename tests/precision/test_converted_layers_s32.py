"""Converted layers that a model replaces after `Precision.convert` (transformers'
``resize_token_embeddings`` builds a new, plain output head for an untied model): warned about once,
and converted by calling ``precision.convert(model)`` again."""

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import Precision
from lowbit.nn.experts import LowbitExperts
from lowbit.nn.linear import LowbitLinear
from lowbit.recipes import get_recipe
from tests.moe import mixtral

UNTIED = LlamaConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
)  # fmt: skip
REPLACED = (
    r"replaced since by plain, unconverted ones .*: lm_head; .*precision\.convert\(model\) again"
)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(copy.deepcopy(UNTIED))  # resize_token_embeddings changes its config


def _train_step(precision, model, optimizer, vocab=64):
    x = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    with precision.autocast():
        loss = model(x, labels=x).loss
    precision.backward(loss)
    precision.step(optimizer)
    optimizer.zero_grad()


def test_a_resized_untied_head_is_warned_about_at_wrap_optimizer_and_converted_again():
    """fp16-mixed converts every layer on CPU, the head included; the head that
    resize_token_embeddings built computed in fp32, without the recipe's fp16 rounding, unsaid."""
    precision = Precision("fp16-mixed")
    model = precision.convert(_llama())
    q_proj = model.model.layers[0].self_attn.q_proj
    precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    model.resize_token_embeddings(80, mean_resizing=False)
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.warns(UserWarning, match=REPLACED):
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    head_weight = model.lm_head.weight
    precision.convert(model)
    assert isinstance(model.lm_head, LowbitLinear) and model.lm_head.weight is head_weight
    assert model.model.layers[0].self_attn.q_proj is q_proj  # the others are kept as they were
    assert model.lm_head.lowbit_state.output_rounding == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(precision, model, optimizer, vocab=80)


def test_a_head_replaced_after_wrap_optimizer_is_warned_about_once_at_the_first_step():
    precision = Precision("fp16-mixed")
    model = precision.convert(_llama())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    model.lm_head = torch.nn.Linear(32, 64, bias=False)
    with pytest.warns(UserWarning, match=REPLACED):
        _train_step(precision, model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(precision, model, optimizer)
        precision.wrap_optimizer(torch.optim.SGD(model.parameters()))


def test_converting_again_keeps_the_master_weights_of_the_layers_converted_before():
    precision = Precision("fp16-low")
    model = precision.convert(_llama())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train_step(precision, model, optimizer)
    weight = model.model.layers[0].mlp.up_proj.weight
    master = precision.update.masters[weight].clone()
    model.resize_token_embeddings(80, mean_resizing=False)
    precision.convert(model)
    assert isinstance(model.lm_head, LowbitLinear)
    assert model.lm_head.weight.dtype == torch.float16
    assert torch.equal(precision.update.masters[weight], master)


def test_a_converted_layer_wrapped_by_an_adapter_is_not_replaced():
    """A LoRA-like wrapper holds the converted layer as its ``base_layer``: still converted."""

    class Adapter(torch.nn.Module):
        def __init__(self, base_layer):
            super().__init__()
            self.base_layer = base_layer
            self.lora_A = torch.nn.Linear(base_layer.in_features, 2, bias=False)
            self.lora_B = torch.nn.Linear(2, base_layer.out_features, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    precision = Precision("fp16-mixed")
    model = precision.convert(_llama())
    attention = model.model.layers[0].self_attn
    attention.q_proj = Adapter(attention.q_proj)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
        _train_step(precision, model, optimizer)


def test_a_replaced_experts_module_of_a_second_model_is_named_with_its_model():
    precision = Precision("fp8-tensorwise")
    first = precision.convert(_llama())
    model = precision.convert(mixtral())
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, LowbitExperts)
    plain = copy.deepcopy(mixtral().model.layers[1].mlp.experts)
    model.model.layers[1].mlp.experts = plain
    with pytest.warns(UserWarning, match=r": model\.layers\.1\.mlp\.experts of model 2 given to"):
        precision.wrap_optimizer(torch.optim.AdamW([*first.parameters(), *model.parameters()]))
    precision.convert(model)
    assert isinstance(model.model.layers[1].mlp.experts, LowbitExperts)


def test_a_bare_layer_converted_again_by_its_precision_is_returned_as_it_is():
    """``layer = precision.convert(layer)`` twice: the converted layer was refused as "a bare
    LowbitLinear has no parent to be swapped in", where a model converts again harmlessly."""
    precision = Precision("fp8-tensorwise")
    layer = precision.convert(torch.nn.Linear(8, 8))
    assert isinstance(layer, LowbitLinear)
    assert precision.convert(layer) is layer


@pytest.mark.parametrize("recipe", ["fp16-low", "bf16-pure-kahan"])
def test_an_embedding_resized_in_place_after_a_step_keeps_its_master_weights_rows(recipe):
    """resize_token_embeddings assigns the embedding's ``.data`` (the Parameter stays): its master
    weight (Kahan buffer) of the old shape failed the next step with "attempting to assign a
    gradient of size [80, 32] to a tensor of size [64, 32]"."""
    precision = Precision(recipe)
    model = precision.convert(_llama())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    _train_step(precision, model, optimizer)
    embedding = model.model.embed_tokens.weight
    kept = {**precision.update.masters, **precision.update.compensation}[embedding].clone()
    model.resize_token_embeddings(80, mean_resizing=False)
    assert model.model.embed_tokens.weight is embedding and embedding.shape == (80, 32)
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = torch.randint(0, 80, (2, 8), generator=torch.Generator().manual_seed(2))
    with precision.autocast():
        precision.backward(model(x, labels=x).loss)
    stand_ins = precision.unscale_(optimizer)
    if recipe == "fp16-low":
        master = precision.update.masters[embedding]
        assert any(t is master for t in stand_ins) and master.shape == (80, 32)
        assert torch.equal(master[:64], kept)  # the extra bits of the rows it had
        assert not torch.equal(kept, embedding[:64].float())
        assert torch.equal(master[64:], embedding[64:].float())
    precision.step(optimizer)
    if recipe == "bf16-pure-kahan":
        assert precision.update.compensation[embedding].shape == (80, 32)


def test_a_head_replaced_after_training_is_warned_about_at_a_new_optimizers_first_unscaling():
    """fp32 parameters step an optimizer precision.wrap_optimizer() never saw: the check is at
    each optimizer's first step or unscaling, and the warning points at the caller's line."""
    precision = Precision(get_recipe("fp8-tensorwise").with_overrides("lm_head=fp8-tensorwise"))
    model = precision.convert(_llama())
    _train_step(precision, model, precision.wrap_optimizer(torch.optim.SGD(model.parameters())))
    model.lm_head = torch.nn.Linear(32, 64, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 64, (2, 8))
    with precision.autocast():
        precision.backward(model(x, labels=x).loss)
    with pytest.warns(UserWarning, match=REPLACED) as caught:
        precision.clip_grad_norm_(optimizer, 1.0)
    assert caught[0].filename == __file__
    precision.step(optimizer)
