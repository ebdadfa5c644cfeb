"""Which layers `lowbit.convert` keeps: routers' linear layers, image classifiers' final layer, and
models it cannot convert yet (session 24's bug hunt)."""

import pytest
import torch
import transformers
from torch import nn

import lowbit
from lowbit.errors import UsageError
from lowbit.nn import LowbitLinear
from lowbit.recipes import get_recipe, parse_override
from tests.nn.test_conv_user_models import TutorialNet

ROUTER = "mixture-of-experts router kept in high precision"
HEAD = "classification head kept in high precision"


def switch_transformers():
    config = transformers.SwitchTransformersConfig(
        vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
        num_heads=2, num_experts=2, encoder_sparse_step=1, decoder_sparse_step=1,
    )  # fmt: skip
    return transformers.SwitchTransformersForConditionalGeneration(config)


def nllb_moe():
    config = transformers.NllbMoeConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_experts=2,
        encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.NllbMoeForConditionalGeneration(config)


def longcat_flash():
    config = transformers.LongcatFlashConfig(
        vocab_size=32, hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=16,
        expert_ffn_hidden_size=8, n_routed_experts=2, moe_topk=1, q_lora_rank=8, kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, zero_expert_num=1,
    )  # fmt: skip
    return transformers.LongcatFlashForCausalLM(config)


def zaya():
    config = transformers.ZayaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=16, num_experts=2, num_experts_per_tok=1,
        router_hidden_size=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return transformers.ZayaForCausalLM(config)


ROUTER_LAYERS = {
    switch_transformers: [
        "encoder.block.0.layer.1.mlp.router.classifier",
        "decoder.block.0.layer.2.mlp.router.classifier",
    ],
    nllb_moe: [
        "model.encoder.layers.0.ffn.router.classifier",
        "model.decoder.layers.0.ffn.router.classifier",
    ],
    longcat_flash: ["model.layers.0.mlp.router.classifier"],
    zaya: [  # the router (``mlp.gate``) is a projection and an MLP of its own
        f"model.layers.0.mlp.gate.{layer}"
        for layer in ("down_proj", "router_mlp.fc1", "router_mlp.fc2", "router_mlp.out_proj")
    ],
}


@pytest.mark.parametrize("build", ROUTER_LAYERS, ids=lambda build: build.__name__)
def test_the_linear_layers_inside_a_router_module_are_kept_as_a_router(build):
    """Switch Transformers', NLLB-MoE's and LongCat-Flash's ``router.classifier`` used to be kept
    as a classification head, and Zaya's router layers were converted; an override of the user's
    still converts them."""
    torch.manual_seed(0)
    model = build()
    names = ROUTER_LAYERS[build]
    originals = {name: model.get_submodule(name) for name in names}
    report = lowbit.convert(model, "fp8-tensorwise")
    assert {name: report.kept.get(name) for name in names} == dict.fromkeys(names, ROUTER)
    assert all(model.get_submodule(name) is layer for name, layer in originals.items())
    assert report.converted  # the experts and attention are converted

    recipe = get_recipe("mxfp8")
    recipe = recipe.with_overrides(parse_override(f"{names[0]}=mxfp8", recipe))
    model = build()
    report = lowbit.convert(model, recipe)
    assert names[0] in report.converted and isinstance(model.get_submodule(names[0]), LowbitLinear)


class Block(nn.Module):
    """A residual block whose MLP has an ``fc1`` and an ``fc2``: hidden layers, not heads."""

    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        x = x + self.conv(x)
        return x + self.fc2(torch.relu(self.fc1(x.transpose(1, -1)))).transpose(1, -1)


class ResNetLike(nn.Module):
    """torchvision's ResNet layout: a stem, stages of blocks, global pooling and ``fc``."""

    def __init__(self, head=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 10) if head else None

    def forward(self, x):
        features = self.layer1(self.conv1(x))
        return self.fc(features.mean((2, 3))) if self.fc is not None else features


@pytest.mark.parametrize(("build", "head"), [(ResNetLike, "fc"), (TutorialNet, "fc2")])
def test_an_image_classifiers_final_linear_layer_is_kept_as_its_head(build, head):
    """A CNN's last linear layer is its classifier, kept as transformers' classification heads
    are (torchvision's ResNet ``fc`` used to be converted); every other layer converts, the
    ``fc1``/``fc2`` inside blocks too, also when the model is converted a second time."""
    torch.manual_seed(0)
    model = build()
    original = model.get_submodule(head)
    x = torch.randn(2, 3, 32, 32)
    report = lowbit.convert(model, "fp8-tensorwise")
    assert report.kept == {head: HEAD} and model.get_submodule(head) is original
    others = [name for name, m in build().named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert sorted(report.converted) == sorted(set(others) - {head})
    features = model(x)  # the head computes as plain PyTorch on the converted features
    assert lowbit.convert(model, "fp8-tensorwise").kept == {head: HEAD}
    assert torch.equal(model(x), features)

    recipe = get_recipe("fp8-tensorwise")
    model = build()
    report = lowbit.convert(model, recipe.with_overrides(parse_override(f"{head}=mxfp8", recipe)))
    assert not report.kept and isinstance(model.get_submodule(head), LowbitLinear)


def test_a_network_without_a_final_linear_classifier_keeps_no_layer():
    """A CNN backbone that ends in a block (its last linear layer, ``fc2``, is a hidden layer) and
    a plain MLP (whose last layer is not told from a hidden one) convert every layer."""
    report = lowbit.convert(ResNetLike(head=False), "fp8-tensorwise")
    assert not report.kept and "layer1.1.fc2" in report.converted
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert list(lowbit.convert(mlp, "fp8-tensorwise").converted) == ["0", "2"]


def test_a_lazy_layer_the_recipe_converts_is_refused_before_any_layer_is_swapped():
    """A ``LazyLinear`` before its first forward was kept silently (reported as an nn.Linear
    subclass) and turned into a plain fp32 layer at that forward."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LazyLinear(4))
    with pytest.raises(UsageError, match=r"^2 is a LazyLinear .* fix: run one forward pass"):
        lowbit.convert(model, "fp8-tensorwise")
    assert type(model[0]) is nn.Linear  # nothing swapped
    model(torch.randn(2, 8))
    assert list(lowbit.convert(model, "fp8-tensorwise").converted) == ["0", "2"]
    kept = nn.ModuleDict({"body": nn.Linear(8, 8), "lm_head": nn.LazyLinear(4)})
    assert list(lowbit.convert(kept, "fp8-tensorwise").converted) == ["body"]


@pytest.mark.parametrize("model", [None, (nn.Sequential(nn.Linear(4, 4)),)])
def test_convert_refuses_what_is_not_a_module_in_one_line(model):
    with pytest.raises(UsageError, match=r"torch\.nn\.Module, got a (NoneType|tuple); fix:"):
        lowbit.convert(model, "fp8-tensorwise")
