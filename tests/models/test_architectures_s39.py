"""Session 39's walk of Hugging Face architectures through lowbit, built from tiny configs (no
downloads)."""

import copy

import torch

import lowbit


def test_a_sparse_attention_model_keeps_its_top_k_keys_under_bf16(tmp_path):
    """DeepSeek-V3.2's attention masks the keys its indexer did not select only where its
    attention implementation is named ``eager`` or ``sdpa``; `Precision.convert` renamed it
    ``lowbit_sdpa`` for the CPU's bf16 attention, and every query attended to every key: other
    logits than the same model's under plain autocast (0.096 of 0.35), silently."""
    import transformers

    config = transformers.DeepseekV32Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        head_dim=8,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        index_topk=4,  # of 16 keys
        index_head_dim=8,
        index_n_heads=2,
        first_k_dense_replace=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(input_ids=ids).logits
    precision = lowbit.Precision("bf16-mixed")
    model = precision.convert(model)
    with torch.no_grad(), precision.autocast():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_the_emulation_warning_counts_a_mixture_of_experts_as_the_report_does(tmp_path, capsys):
    """`lowbit train` of a Mixtral said "converted 10/13 layers" and then that "its 24
    low-precision layers" run in emulation: each expert's GEMMs counted as a layer of its own."""
    import transformers

    from lowbit.cli import main

    config = transformers.MixtralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    config.save_pretrained(tmp_path / "mixtral")  # a config.json only: trained from scratch
    args = ["--model", str(tmp_path / "mixtral"), "--recipe", "fp8-tensorwise", "--steps", "1"]
    args += ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
    args += ["--out", str(tmp_path / "run"), "--override", "lm_head=keep"]
    assert main(["train", *args]) == 0
    err = capsys.readouterr().err
    assert "converted 10/13 layers" in err, err
    assert "its 10 low-precision layers run in bit-faithful emulation" in err, err


def test_quantize_names_the_routers_it_keeps():
    """A Mixtral's routers (``mlp.gate``, which compute their logits with their own weight) stay
    in fp32 when quantized, as in training, but the report counted them nowhere ("quantized 11/12
    layers", the one kept an embedding), where training's names them kept."""
    import transformers

    from lowbit.infer import QuantRecipe, Target, quantize_model

    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    report = quantize_model(model, QuantRecipe(Target("int8")))
    assert (
        report.kept["model.layers.0.mlp.gate"] == "mixture-of-experts router kept in high precision"
    )
    assert "quantized 6/8 layers" in report.summary("quantized")


def test_a_layer_whose_weight_its_parent_multiplies_is_reported_kept():
    """NeoMME's masked-LM head computes ``hidden_states @ self.unembedding_projection.weight``,
    never calling that layer: converted, it was reported in fp8 ("converted 11/12 layers") while
    its GEMM ran in fp32."""
    import transformers

    config = transformers.NeoMMEConfig(
        vocab_size=64,
        embedding_rank=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    model = transformers.NeoMMEForMaskedLM(config)
    report = lowbit.convert(model, "fp8-tensorwise")
    assert "unembedding_projection" not in report.converted
    assert "never calling the layer" in report.kept["unembedding_projection"]


def test_quantize_and_prune_keep_the_router_layers_training_keeps():
    """Switch Transformers' router is a module holding a linear layer, ``router.classifier``:
    training's presets keep it in high precision (a rounding changes where tokens go), but
    `quantize_model` quantized it with the experts, as any linear layer, and `prune_model` kept
    it dense as an "output head" (its name ends in ``classifier``)."""
    import transformers

    from lowbit.infer import QuantRecipe, Target, prune_model, quantize_model
    from lowbit.recipes.presets import ROUTER_KEPT

    config = transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        num_experts=2,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    )
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    fresh = copy.deepcopy(model)
    trained = lowbit.convert(copy.deepcopy(model), "fp8-tensorwise")
    routers = {name for name, reason in trained.kept.items() if reason == ROUTER_KEPT}
    assert "encoder.block.0.layer.1.mlp.router.classifier" in routers
    report = quantize_model(model, QuantRecipe(Target("int8")))
    assert {name for name, reason in report.kept.items() if reason == ROUTER_KEPT} == routers
    assert type(model.get_submodule("encoder.block.0.layer.1.mlp.router.classifier")) is (
        torch.nn.Linear
    )
    pruned = prune_model(pruned_model := copy.deepcopy(fresh), sparsity=0.5)  # and pruning
    assert {name for name, reason in pruned.kept.items() if reason == ROUTER_KEPT} == routers
    router = "encoder.block.0.layer.1.mlp.router.classifier.weight"
    assert torch.equal(pruned_model.state_dict()[router], fresh.state_dict()[router])


def test_a_quantized_mixture_of_experts_keeps_its_shared_expert_gate_through_export_and_eval(
    tmp_path, capsys
):
    """Qwen2-MoE's ``shared_expert_gate``, a linear layer that training keeps as a router, was
    quantized by ``lowbit quantize``; kept, it is stored and exported as trained, and the folder
    evaluates."""
    import json

    import transformers
    from safetensors.torch import load_file

    from lowbit.cli import main

    config = transformers.Qwen2MoeConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    config.save_pretrained(tmp_path / "qwen")
    run, folder, hf = tmp_path / "run", tmp_path / "int8", tmp_path / "hf"
    args = ["--model", str(tmp_path / "qwen"), "--recipe", "bf16-mixed", "--steps", "1"]
    args += ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--out", str(run)]
    assert main(["train", *args]) == 0
    assert main(["quantize", str(run), "--to", "int8", "--out", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "mixture-of-experts router kept in high precision" in out, out
    manifest = json.loads((folder / "quantization.json").read_text())
    gate = "model.layers.0.mlp.shared_expert_gate"
    assert gate not in manifest["layers"]
    assert manifest["kept"][gate] == "mixture-of-experts router kept in high precision"
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0
    assert main(["export", str(folder), "--out", str(hf)]) == 0
    kept = load_file(folder / "model.safetensors")[f"{gate}.weight"]  # as trained, in fp32
    assert torch.equal(load_file(hf / "model.safetensors")[f"{gate}.weight"], kept)
