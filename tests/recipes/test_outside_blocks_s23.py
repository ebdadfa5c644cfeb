"""The GEMM layers around a model's stack of blocks (``{outside blocks}``), and mixture-of-experts
routers that are modules of their own in the conversion report (session 23)."""

import copy

import pytest
import torch
import transformers

from lowbit.models import build_causal_lm, build_cnn
from lowbit.nn.convert import convert
from lowbit.recipes import get_recipe, parse_override

SIZES = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def _electra():
    config = transformers.ElectraConfig(embedding_size=16, num_hidden_layers=3, **SIZES)
    return transformers.ElectraForMaskedLM(config)


def _albert():  # three layer groups: three blocks of one layer each
    config = transformers.AlbertConfig(
        embedding_size=16, num_hidden_layers=3, num_hidden_groups=3, **SIZES
    )
    return transformers.AlbertForMaskedLM(config)


def _modernbert():
    config = transformers.ModernBertConfig(
        num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2, **SIZES,
    )  # fmt: skip
    return transformers.ModernBertForMaskedLM(config)


def _keeping_outside_blocks(preset: str):
    recipe = get_recipe(preset)
    return recipe.with_overrides(parse_override("{outside blocks}=keep", recipe))


# Tiny models of three blocks and their GEMM layers outside the blocks (not heads by name)
AROUND_THE_BLOCKS = pytest.mark.parametrize(
    ("build", "outside"),
    [
        (_electra, {"electra.embeddings_project", "generator_predictions.dense"}),
        (_albert, {"albert.encoder.embedding_hidden_mapping_in", "predictions.dense"}),
        (_modernbert, {"head.dense"}),
    ],
    ids=["electra", "albert", "modernbert"],
)


@AROUND_THE_BLOCKS
def test_outside_blocks_keeps_the_projections_around_the_blocks(build, outside):
    # `--override '{outside blocks}=keep'`: the embedding projections and the masked-LM head's
    # dense layer (in no block), which NVIDIA's NVFP4 recipe leaves in bf16 and which nvfp4
    # converted, as fp8-tensorwise does.
    torch.manual_seed(0)
    model = build()
    plain = convert(copy.deepcopy(model), "fp8-tensorwise")
    report = convert(model, _keeping_outside_blocks("fp8-tensorwise"))
    assert outside <= set(plain.converted)
    assert set(report.converted) == set(plain.converted) - outside  # every block's layer
    for name in outside:
        assert report.kept[name] == "override {outside blocks}=keep"
        assert type(model.get_submodule(name)) is torch.nn.Linear
    assert report.unused_overrides == []


@pytest.mark.parametrize("preset", ["fp8-tensorwise", "nvfp4"])
def test_outside_blocks_is_nothing_in_a_model_without_blocks_or_beside_a_llama_head(preset):
    # The digits CNN's Sequential of single layers has no blocks (nvfp4 keeps its ends as
    # FIRST_BLOCK and LAST_BLOCK), so no layer is outside them; a Llama has nothing outside its
    # blocks but the output head, which the presets keep anyway.
    for model in (build_cnn("tiny"), build_causal_lm("tiny", 257)):
        plain = convert(copy.deepcopy(model), preset)
        report = convert(model, _keeping_outside_blocks(preset))
        assert report.converted == plain.converted
    assert report.kept["lm_head"] == "override {outside blocks}=keep"
    cnn_report = convert(build_cnn("tiny"), _keeping_outside_blocks(preset))
    assert cnn_report.unused_overrides == ["{outside blocks}=keep"]


@AROUND_THE_BLOCKS
def test_nvfp4_keeps_the_gemm_layers_outside_the_blocks(build, outside):
    # NVIDIA's NVFP4 recipe quantizes the blocks' linear layers only; nvfp4 converted these.
    torch.manual_seed(0)
    model = build()
    report = convert(model, "nvfp4")
    reason = "outside the blocks (not a block's GEMM) kept in bf16 (NVFP4)"
    assert {name for name, why in report.kept.items() if why == reason} == outside
    assert report.converted and all(".1." in name for name in report.converted)  # middle block


def test_nvfp4_converts_the_middle_blocks_of_a_llama_as_before():
    model = build_causal_lm("tiny", 257)
    last = len(model.model.layers) - 1
    middle = {
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and name.split(".")[2:3] not in ([], ["0"], [f"{last}"])
    }
    report = convert(model, "nvfp4")
    assert set(report.converted) == middle and len(middle) == 7 * (last - 1)
    assert report.kept["lm_head"] == "output head kept in high precision"


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[2],
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


@pytest.mark.parametrize("preset", ["fp8-tensorwise", "nvfp4", "fp32"])
def test_topk_router_modules_are_reported_kept(preset):
    # Qwen3-MoE's router (mlp.gate, a Qwen3MoeTopKRouter: F.linear of its own weight) is a GEMM
    # that no recipe converts; the report left it out, as if the model had none.
    torch.manual_seed(0)
    model = _qwen3_moe()
    routers = {f"model.layers.{i}.mlp.gate": model.model.layers[i].mlp.gate for i in (0, 1)}
    report = convert(model, preset)
    for name, router in routers.items():
        assert report.kept[name] == "mixture-of-experts router kept in high precision"
        assert model.get_submodule(name) is router  # the very module: it computes as before
    dense_gate = report.kept.get("model.layers.2.mlp.gate_proj", "")  # a dense MLP's: no router
    assert "router" not in dense_gate
