"""Initialisation of converted layers by code that finds layers with ``isinstance``: transformers'
``_init_weights`` (``init_weights()``, ``initialize_weights()``, ``apply(model._init_weights)``),
a user's ``model.apply(init)``; and 16-bit Parameters drawn as an fp32 model's, rounded."""

import copy
import pickle

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit import Precision
from lowbit.nn.linear import LowbitConv1D, LowbitLinear, LowbitModule

LLAMA = LlamaConfig(
    vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=64,
)  # fmt: skip
GPT2 = GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2)

INITS = {
    "init_weights": lambda model: model.init_weights(),
    "initialize_weights": lambda model: model.initialize_weights(),
    "apply(_init_weights)": lambda model: model.apply(model._init_weights),
}


def _deferred(build, recipe, init):
    """``build()`` on the meta device, converted by ``recipe`` (None: not), ``to_empty`` and
    initialised by ``init`` from seed 0."""
    with torch.device("meta"):
        model = build()
    if recipe is not None:
        lowbit.convert(model, recipe)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    init(model)
    return model


def _assert_same_parameters(expected, model):
    for (name, a), b in zip(expected.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("init", INITS)
def test_transformers_init_draws_converted_layers_as_the_unconverted_model(init):
    """The converted layers were no nn.Linear to ``_init_weights``: they kept ``to_empty``'s
    uninitialised memory (NaN, 1e34), and every later draw (the head) came out different."""
    plain = _deferred(lambda: LlamaForCausalLM(LLAMA), None, INITS[init])
    model = _deferred(lambda: LlamaForCausalLM(LLAMA), "fp8-tensorwise", INITS[init])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LowbitLinear) and isinstance(q_proj, torch.nn.Linear)
    _assert_same_parameters(plain, model)


def test_gpt2s_converted_conv1d_layers_initialise_as_transformers_draws_them():
    from transformers.pytorch_utils import Conv1D

    plain = _deferred(lambda: GPT2LMHeadModel(GPT2), None, INITS["init_weights"])
    model = _deferred(lambda: GPT2LMHeadModel(GPT2), "fp8-tensorwise", INITS["init_weights"])
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LowbitConv1D) and isinstance(c_attn, Conv1D)
    assert repr(c_attn).startswith("LowbitConv1D(nf=48, nx=16, fwd fp8_e4m3")
    _assert_same_parameters(plain, model)
    model.eval()
    x = torch.randint(0, 100, (2, 8))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied.transformer.h[0].attn.c_attn) is type(c_attn)
        assert torch.equal(copied(x).logits, model(x).logits)


def test_init_weights_after_converting_an_initialised_model_draws_nothing_again():
    """The replaced layer's ``_is_hf_initialized`` carries over: a model initialised when built,
    then converted, keeps its weights through ``init_weights()`` as the unconverted one does."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LLAMA)
    model = copy.deepcopy(plain)
    lowbit.convert(model, "fp8-tensorwise")
    for m in (plain, model):
        torch.manual_seed(1)
        m.init_weights()
    _assert_same_parameters(plain, model)


class _NanoGPTBlock(torch.nn.Module):
    """nanoGPT's way: a flag on the layer that its init reads, found by ``isinstance``."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.c_proj.NANOGPT_SCALE_INIT = 1


def _nanogpt_init(module):
    if isinstance(module, torch.nn.Linear):
        std = 0.02 * (0.1 if hasattr(module, "NANOGPT_SCALE_INIT") else 1)
        torch.nn.init.normal_(module.weight, std=std)
        torch.nn.init.zeros_(module.bias)


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 5),
    )


def _xavier(module):
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        torch.nn.init.xavier_uniform_(module.weight)
        torch.nn.init.zeros_(module.bias)


@pytest.mark.parametrize(
    ("build", "init"), [(_NanoGPTBlock, _nanogpt_init), (_cnn, _xavier)], ids=["nanogpt", "cnn"]
)
def test_a_users_isinstance_init_reaches_the_converted_layers(build, init):
    plain = _deferred(build, None, lambda model: model.apply(init))
    model = _deferred(build, "fp8-tensorwise", lambda model: model.apply(init))
    assert sum(isinstance(m, LowbitModule) for m in model.modules()) == 2
    _assert_same_parameters(plain, model)


def test_fp16_parameters_are_drawn_as_an_fp32_models_rounded():
    """fp16-low's converted layers, built on meta and initialised by ``reset_parameters``, hold
    the weights of the model built in fp32 and converted; drawn in fp16, 0.1-0.2% of them had
    the sign of the uniform draw's bound flipped."""
    torch.manual_seed(0)
    expected = Precision("fp16-low").convert(_cnn())
    precision = Precision("fp16-low")
    with torch.device("meta"):
        model = precision.convert(_cnn())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert isinstance(model[2], LowbitModule) and model[2].weight.dtype == torch.float16
    _assert_same_parameters(expected, model)
