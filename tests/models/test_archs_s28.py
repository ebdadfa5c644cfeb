"""Session 28: Hugging Face architectures not covered before (Qwen2/3, Gemma 2, Phi-3, OLMoE,
GPT-NeoX, BLOOM, JetMoE, Llama-4), built from tiny configs (no downloads) and converted."""

import copy

import pytest
import torch

import lowbit
from lowbit.formats.error import sqnr

BASE = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
BASE |= {"intermediate_size": 64}
GQA = BASE | {"num_key_value_heads": 2}
JETMOE = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_key_value_heads": 2}
JETMOE |= {"kv_channels": 8, "intermediate_size": 64, "num_local_experts": 4}
LLAMA4 = GQA | {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 1}
LLAMA4 |= {"intermediate_size_mlp": 64, "interleave_moe_layer_step": 1}


def _model(config_class: str, **fields):
    import transformers

    config = getattr(transformers, config_class)(**fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("config_class", "fields", "experts"),
    [
        ("JetMoeConfig", JETMOE, ["model.layers.0.mlp.input_linear",
                                  "model.layers.0.self_attention.experts.output_linear"]),
        ("Llama4TextConfig", LLAMA4, ["model.layers.0.feed_forward.experts"]),
    ],
)  # fmt: skip
def test_experts_of_a_layout_of_their_own_are_reported_kept(config_class, fields, experts):
    """JetMoE's experts (one 3-D ``weight`` per projection, in the MLP and in its mixture of
    attention heads) and Llama-4's (a ``bmm`` over 3-D ``gate_up_proj``/``down_proj``) are not
    transformers' experts interface: they computed in high precision, and the report left them
    out ("converted 2/7 layers" for a JetMoE whose every GEMM but two is an expert's)."""
    model = _model(config_class, **fields)
    report = lowbit.convert(model, "fp8-tensorwise")
    reported = (*report.converted, *report.kept)
    stacked = [name for name, p in model.named_parameters() if p.dim() == 3]
    assert stacked and all(name.rpartition(".")[0] in reported for name in stacked)
    for name in experts:
        assert "in a layout of its own" in report.kept[name]
        assert report.kept[name].endswith("not converted")


@pytest.mark.parametrize(
    ("config_class", "fields", "floor"),
    [
        ("Qwen2Config", GQA, 25),
        ("Qwen3Config", GQA | {"head_dim": 8}, 25),
        ("Gemma2Config", GQA | {"head_dim": 8, "sliding_window": 4}, 15),  # post-norms: ~18 dB
        ("Phi3Config", GQA | {"pad_token_id": 0}, 25),  # fused qkv_proj and gate_up_proj
        ("OlmoeConfig", GQA | {"num_experts": 4, "num_experts_per_tok": 2}, 25),
        ("GPTNeoXConfig", BASE, 25),  # fused query_key_value
        ("BloomConfig", {"vocab_size": 64, "hidden_size": 32, "n_layer": 2, "n_head": 4}, 25),
    ],
)  # fmt: skip
def test_a_training_step_of_each_architecture_in_fp8(config_class, fields, floor):
    """Each converted layer runs in the forward, one fp8 step gives a finite loss near fp32's,
    and the logits keep an SQNR (dB) to fp32's of a tiny fp8 model."""
    base = _model(config_class, **fields)
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    base.eval()
    with torch.no_grad():
        reference = base(input_ids=ids, labels=ids)
    model = copy.deepcopy(base)
    precision = lowbit.Precision("fp8-tensorwise")
    model = precision.convert(model)
    report = precision.conversion_report
    assert set(report.kept) <= {"lm_head", *(n for n in report.kept if n.endswith(".mlp.gate"))}
    called = set()
    for name, layer in model.named_modules():
        if name in report.converted:
            layer.register_forward_hook(lambda *_, name=name: called.add(name))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    with precision.autocast():
        out = model(input_ids=ids, labels=ids)
    assert called == set(report.converted)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - reference.loss.item()) < 0.05
    assert sqnr(reference.logits, out.logits.float()) > floor
    precision.backward(out.loss)
    assert precision.step(optimizer)


def test_quantize_reports_experts_of_a_layout_of_their_own_kept():
    """`lowbit quantize` left JetMoE's experts in fp32 under "quantized 7/8 layers", unnamed."""
    from lowbit.infer.model import quantize_model
    from lowbit.infer.quant import QuantRecipe, Target

    model = _model("JetMoeConfig", **JETMOE)
    report = quantize_model(model, QuantRecipe(Target("int8")))
    stacked = {name.rpartition(".")[0] for name, p in model.named_parameters() if p.dim() == 3}
    assert stacked and all(
        report.kept.get(name, "").endswith("not quantized") for name in stacked
    ), report.kept


def test_a_multimodal_gemma3_checkpoint_trains_as_a_causal_lm(tmp_path, capsys):
    """Published Gemma 3 checkpoints name only ``Gemma3ForConditionalGeneration``, the class
    transformers' AutoModelForCausalLM builds for ``gemma3``: they were refused as "not a causal
    language model" with that very class as the fix, and their vocabulary (in ``text_config``)
    was read from the top config."""
    import transformers

    from lowbit.cli import main

    text = GQA | {"vocab_size": 300, "head_dim": 8, "sliding_window": 16}
    text |= {"max_position_embeddings": 64}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision)
    config.mm_tokens_per_image = 4
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "gemma3")
    args = ["--model", str(tmp_path / "gemma3"), "--steps", "1", "--seq-len", "16"]
    args += ["--batch-size", "2", "--eval-batches", "1", "--out", str(tmp_path / "run")]
    assert main(["train", *args, "--quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints").is_dir()
    capsys.readouterr()
    too_long = [
        *args[:-2],
        "--seq-len",
        "65",
        "--out",
        str(tmp_path / "long"),
    ]  # the last --seq-len
    assert main(["train", *too_long, "--quiet"]) == 2
    assert "exceeds the model's 64 positions" in capsys.readouterr().err
