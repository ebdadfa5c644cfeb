"""Session 40's walk after training: quantize, prune, export, generate and eval a run."""

import json

import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main
from lowbit.infer import load_source


def test_a_pruned_folder_stores_a_tied_head_once(gpt2_run, tmp_path, capsys):
    """GPT-2's head is its embedding, which pruning leaves dense: the pruned folder stored a copy
    of it under each name, so `prune` printed the folder larger than the run by the embedding
    (and a quantize of it measured against that larger file). It is stored once, as the
    checkpoint stores it, and loads tied again."""
    out = tmp_path / "pruned"
    argv = ["prune", str(gpt2_run), "--sparsity", "0.5", "--max-batches", "1", "--out", str(out)]
    assert main(argv) == 0
    size = json.loads((out / "quantization.json").read_text())["bytes"]
    embedding = load_source(gpt2_run).model.transformer.wte.weight
    assert size["quantized"] - size["original"] < embedding.nbytes // 4  # the header only
    model = load_source(out).model
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.transformer.wte.weight, embedding, rtol=0, atol=0)
    assert main(["quantize", str(out), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()

    # a folder written before, with a copy under each name, loads as it did
    state = load_file(out / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, out / "model.safetensors")
    manifest = json.loads((out / "quantization.json").read_text())
    del manifest["crc32"]  # recorded since session 42
    (out / "quantization.json").write_text(json.dumps(manifest))
    model = load_source(out).model
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_second_quantize_into_the_same_out_leaves_the_first_ones_writing(
    lm_run, tmp_path, monkeypatch, capsys
):
    """Two quantizes into one new --out at once: the second deleted the first one's hidden
    folder as a stale one while the first still wrote into it, and the first then failed with a
    traceback (or, finishing last, replaced the second's folder unasked). The folder being
    written is left alone, and the one that finishes last is refused as any --out that exists."""
    import safetensors.torch

    out = tmp_path / "q"
    save_file = safetensors.torch.save_file
    calls = []

    def second_one_meanwhile(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:  # the first quantize is writing: the second runs to its end
            assert main(["quantize", str(lm_run), "--to", "int4", "--out", str(out)]) == 0
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", second_one_meanwhile)
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"lowbit: error: {out} exists and is not empty; fix: remove it, choose another --out, or pass --force"
    ]
    assert json.loads((out / "quantization.json").read_text())["quantization"]["format"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no hidden folder left
