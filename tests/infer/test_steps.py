"""Quantize / prune / export a trained tiny run, through the library and the CLI."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from lowbit.cli import main
from lowbit.formats.error import sqnr
from lowbit.infer import (
    QuantRecipe,
    dequantize_model,
    load_source,
    magnitude_mask,
    quant_layers,
    quantize_model,
    quantize_run,
)
from lowbit.infer import io as infer_io
from lowbit.infer.steps import prune_run


def lm_logits(model, seed=0):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize(
    "to, mode, group",
    [
        ("int8", "weights-only", None),
        ("int8", "weights-and-activations", None),
        ("int4", "weights-only", 8),
        ("fp8", "weights-only", None),
        ("mxfp4", "weights-and-activations", None),
        ("nvfp4", "weights-only", None),
    ],
)
def test_quantize_save_load_gives_the_same_outputs(lm_run, tmp_path, to, mode, group):
    source = load_source(lm_run)
    reference = lm_logits(source.model)
    quantize_model(source.model, QuantRecipe(to, mode, group))
    before = lm_logits(source.model)
    infer_io.save(
        source,
        source.model,
        {
            "quantization": QuantRecipe(to, mode, group).to_dict(),
            "source": infer_io.source_record(source),
            "layers": list(quant_layers(source.model)),
        },
        tmp_path / "q",
    )
    loaded = load_source(tmp_path / "q")
    assert all(layer.recipe.format.value == to for layer in quant_layers(loaded.model).values())
    assert torch.equal(lm_logits(loaded.model), before)
    assert not torch.equal(before, reference)  # it was quantized ...
    assert torch.allclose(before, reference, atol=0.5)  # ... and still the same model


def test_quantize_cli_writes_a_smaller_honest_checkpoint(lm_run, tmp_path, capsys):
    out = tmp_path / "int4"
    assert (
        main(
            [
                "quantize",
                str(lm_run),
                "--to",
                "int4",
                "--group-size",
                "32",
                "--pad-groups",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "quantized 29/30 layers" in printed and "x smaller" in printed
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["quantization"]["format"] == "int4"
    assert manifest["quantization"]["group_size"] == 32
    assert manifest["bytes"]["quantized"] < manifest["bytes"]["original"] / 4
    with safe_open(out / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        s = f.get_tensor("model.layers.0.mlp.down_proj.scale")
        assert q.dtype == torch.uint8 and q.shape == (128, 172)  # 344 int4 per row, 2 per byte
        assert s.shape == (128, 11)  # ceil(344 / 32) groups, the last one padded
        assert json.loads(f.metadata()["lowbit"])["format"] == "int4"
    assert (out / "tokenizer").is_dir() and (out / "config.yaml").is_file()


def test_eval_and_generate_read_a_quantized_folder(lm_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert (
        main(
            [
                "quantize",
                str(lm_run),
                "--to",
                "int8",
                "--weights-and-activations",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--max-batches", "1", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["baseline"]["ppl"] > 1
    assert abs(metrics["ppl"] / metrics["baseline"]["ppl"] - 1) < 0.02
    assert main(["eval", str(out), "--max-batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "int8 x int8 GEMM" in text and "ppl" in text and "change" in text
    assert (
        main(
            [
                "generate",
                str(out),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("def ")
    assert "int8 x int8 GEMM" in captured.err


def test_eval_of_a_folder_whose_source_is_gone_reports_its_own_metrics(lm_run, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(lm_run, source)
    out = tmp_path / "int4"
    assert main(["quantize", str(source), "--to", "int4", "--out", str(out)]) == 0
    shutil.rmtree(source)
    capsys.readouterr()
    assert main(["eval", str(out), "--max-batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "is not there, moved or deleted" in text and "reference: the source model" not in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert float(rows["loss"][0]) > 0 and float(rows["ppl"][0]) > 1


def test_eval_reports_per_label_f1_for_classification(digits_run, tmp_path, capsys):
    out = tmp_path / "digits-int4"
    assert main(["quantize", str(digits_run), "--to", "int4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 2: convolutions are not quantized" in printed
    assert main(["eval", str(out), "--max-batches", "2"]) == 0
    text = capsys.readouterr().out
    assert "per-label F1" in text and "accuracy" in text


def test_prune_unstructured_and_2_of_4(lm_run, tmp_path, capsys):
    assert (
        main(
            [
                "prune",
                str(lm_run),
                "--sparsity",
                "0.5",
                "--out",
                str(tmp_path / "s50"),
                "--max-batches",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "pruned 28/29 layers" in printed and "output head kept dense" in printed
    assert "ppl" in printed and "change" in printed
    pruned = load_source(tmp_path / "s50").model
    q = pruned.model.layers[1].self_attn.q_proj.weight
    assert abs((q == 0).float().mean().item() - 0.5) < 0.01
    assert (pruned.lm_head.weight != 0).all()

    assert main(["prune", str(lm_run), "--pattern", "2:4", "--out", str(tmp_path / "24")]) == 0
    capsys.readouterr()
    w = load_source(tmp_path / "24").model.model.layers[0].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    # prune, then quantize the pruned folder: zeros stay zeros
    assert (
        main(["quantize", str(tmp_path / "24"), "--to", "int8", "--out", str(tmp_path / "24-int8")])
        == 0
    )
    capsys.readouterr()
    layer = load_source(tmp_path / "24-int8").model.model.layers[0].mlp.down_proj
    assert ((layer.dequantized_weight() == 0) == (w == 0)).all()


def test_magnitude_mask_keeps_the_largest_weights():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    mask = magnitude_mask(w, sparsity=0.75)
    assert mask.sum() == 128
    assert w[mask].abs().min() >= w[~mask].abs().max()
    mask = magnitude_mask(w, pattern=(2, 4))
    groups, kept = w.abs().reshape(16, 8, 4), mask.reshape(16, 8, 4)
    assert (kept.sum(-1) == 2).all()
    kept_min = groups.masked_fill(~kept, float("inf")).amin(-1)
    dropped_max = groups.masked_fill(kept, -1).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_export_loads_back_in_transformers(lm_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    quant = quantize_run(lm_run, "int4", group_size=64, pad_groups=True, out=tmp_path / "q").out
    assert main(["export", str(quant), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "int4 dequantized to fp32" in printed and "lowbit_tokenizer.json" in printed
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_source(quant).model
    torch.testing.assert_close(lm_logits(hf), lm_logits(ours), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "lowbit_tokenizer.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "{tmp}/nowhere", "--to", "int8"], "no such folder"),
        (["quantize", "{tmp}", "--to", "int8"], "no config.yaml, not a lowbit run folder"),
        (["quantize", "{run}", "--to", "fp6_e3m2"], "not a quantization target; fix: use --to"),
        (
            ["quantize", "{run}", "--to", "int8", "--group-size", "48"],
            "--group-size 48 does not divide the 128 in-features of model.layers.0.self_attn.q_proj",
        ),
        (["quantize", "{run}", "--to", "nvfp4", "--group-size", "32"], "nvfp4 uses blocks of 16"),
        (["prune", "{run}", "--pattern", "3:2"], "need 0 < N < M"),
        (["prune", "{run}", "--sparsity", "1.5"], "outside [0, 1)"),
        (["eval", "{run}", "--split", "dev"], "unknown split"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(lm_run, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=lm_run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and message in err and err.count("\n") == 1


def test_quantized_and_non_lm_folders_refuse_the_wrong_step(lm_run, digits_run, tmp_path, capsys):
    quant = quantize_run(lm_run, "int8", out=tmp_path / "q").out
    for argv, message in [
        (["quantize", str(quant), "--to", "int4"], "is already quantized"),
        (["prune", str(quant), "--sparsity", "0.5"], "prune the run it came from"),
        (["export", str(digits_run), "--out", str(tmp_path / "hf")], "export a causal-lm run"),
        (["quantize", str(lm_run), "--to", "int8", "--out", str(quant)], "exists and is not empty"),
        (["eval", str(quant), "--checkpoint", "x.pt"], "drop --checkpoint"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_gpt2_conv1d_projections_quantize_prune_and_export(gpt2_run, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    reference = lm_logits(load_source(gpt2_run).model)
    quant = quantize_run(gpt2_run, "int8", mode="weights-and-activations", out=tmp_path / "q")
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    projections = {f"transformer.h.{i}.{name}" for i in range(2) for name in names}
    assert set(quant.report.changed) == projections | {"lm_head"}
    loaded = load_source(quant.out).model
    assert set(quant_layers(loaded)) == projections | {"lm_head"}
    assert sqnr(reference, lm_logits(loaded)) > 25  # quantized, still the same model

    pruned = prune_run(gpt2_run, pattern="2:4", out=tmp_path / "p")
    assert set(pruned.report.changed) == projections  # the head stays dense
    c_fc = pruned.model.transformer.h[0].mlp.c_fc.weight  # in x out: 2 of every 4 inputs
    assert ((c_fc.t().reshape(-1, 4) != 0).sum(-1) <= 2).all()
    pruned_weights = sum(pruned.model.get_submodule(n).weight.numel() for n in projections)
    all_weights = pruned_weights + pruned.model.lm_head.weight.numel()
    assert pruned.manifest["pruning"]["sparsity"] == pytest.approx(
        0.5 * pruned_weights / all_weights
    )

    int4 = quantize_run(gpt2_run, "int4", group_size=32, out=tmp_path / "q4").out
    assert main(["export", str(int4), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, GPT2LMHeadModel)  # Conv1D weights stored in x out, as GPT-2 loads them
    torch.testing.assert_close(lm_logits(hf), lm_logits(load_source(int4).model))


def test_falcon_layers_quantize_and_dequantize_back_to_their_own_class():
    from transformers import FalconConfig, FalconForCausalLM
    from transformers.models.falcon.modeling_falcon import FalconLinear

    config = FalconConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=257
    )
    model = FalconForCausalLM(config).eval()
    report = quantize_model(model, QuantRecipe("int4", "weights-only", 16))
    assert len(report.changed) == 9  # 4 per block and the head
    quantized = lm_logits(model)
    dequantize_model(model)
    assert type(model.transformer.h[0].mlp.dense_h_to_4h) is FalconLinear
    torch.testing.assert_close(lm_logits(model), quantized)


def test_mixture_of_experts_layers_quantize_load_and_export(mixtral_run, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from lowbit.infer.experts import QuantExperts

    reference = lm_logits(load_source(mixtral_run).model)
    quant = quantize_run(mixtral_run, "int8", mode="weights-and-activations", out=tmp_path / "q")
    experts = {f"model.layers.{i}.mlp.experts" for i in range(2)}
    assert experts <= set(quant.report.changed) and not quant.report.kept.keys() & experts
    loaded = load_source(quant.out).model  # the quantized experts load back
    assert all(isinstance(loaded.get_submodule(name), QuantExperts) for name in experts)
    assert sqnr(reference, lm_logits(loaded)) > 25  # quantized, still the same model
    # the expert matrices are most of the weights: the folder is ~3.8x smaller than fp32
    linear = quant.manifest["linear_bytes"]
    assert linear["original"] / linear["quantized"] > 3.5

    pruned = prune_run(mixtral_run, pattern="2:4", out=tmp_path / "p")
    assert experts <= set(pruned.report.changed)
    for kind in ("gate_up_proj", "down_proj"):  # each expert matrix (out x in): 2 of 4 inputs
        matrices = getattr(pruned.model.model.layers[1].mlp.experts, kind)
        assert ((matrices.reshape(-1, 4) != 0).sum(-1) <= 2).all()

    int4 = quantize_run(mixtral_run, "int4", group_size=32, out=tmp_path / "q4").out
    assert main(["export", str(int4), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, MixtralForCausalLM)  # 3-D experts, as transformers stores them
    torch.testing.assert_close(lm_logits(hf), lm_logits(load_source(int4).model))


def test_out_that_is_a_file_is_refused_and_untouched(lm_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for argv in [
        ["export", lm_run, "--out", afile],
        ["export", lm_run, "--out", afile, "--force"],
        ["quantize", lm_run, "--to", "int4", "--out", afile],
        ["prune", lm_run, "--pattern", "2:4", "--out", afile],
    ]:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert (
            err
            == f"lowbit: error: {afile}: exists and is not a folder; fix: choose another --out\n"
        )
    assert afile.read_text() == "mine"


def test_force_replaces_another_artifact_and_refuses_a_training_run(lm_run, tmp_path):
    """--force into a folder holding a pruned folder (or an export) removes what that wrote, so
    no quantization.json describes weights it did not write; a training run is refused."""
    import shutil

    trained_run = lm_run
    folder = tmp_path / "artifact"
    assert main(["prune", str(trained_run), "--sparsity", "0.5", "--out", str(folder)]) == 0
    (folder / "notes.txt").write_text("mine")
    assert main(["export", str(trained_run), "--out", str(folder), "--force"]) == 0
    assert not (folder / "quantization.json").exists() and (folder / "notes.txt").exists()
    assert (
        main(["quantize", str(trained_run), "--to", "int8", "--out", str(folder), "--force"]) == 0
    )
    assert not (folder / "lowbit_export.json").exists() and not (folder / "config.json").exists()
    assert json.loads((folder / "quantization.json").read_text())["quantization"]
    assert main(["quantize", str(trained_run), "--to", "int8", "--out", str(trained_run)]) == 2
    other = tmp_path / "other-run"
    shutil.copytree(trained_run, other)
    assert main(["quantize", str(trained_run), "--to", "int8", "--out", str(other), "--force"]) == 2
