"""Inference commands used as a demanding user would: odd arguments, folders mixed up, --force."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.infer import export_hf, load_source, quant_layers, quantize_run, set_kernel
from tests.infer.conftest import _train


def one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_export_into_its_own_source_folder_is_refused_even_with_force(lm_run, tmp_path, capsys):
    quant = quantize_run(lm_run, "int8", out=tmp_path / "q").out
    before = sorted(p.name for p in quant.iterdir())
    assert main(["export", str(quant), "--out", str(quant), "--force"]) == 2
    one_line_error(capsys, "is the source folder")
    assert sorted(p.name for p in quant.iterdir()) == before  # the quantized folder is intact
    assert load_source(quant).quantized


def test_prune_refuses_negative_max_batches_before_writing(lm_run, tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["prune", str(lm_run), "--pattern", "2:4", "--out", str(out), "--max-batches", "-1"]
    assert main(argv) == 2
    one_line_error(capsys, "--max-batches -1")
    assert not out.exists()


@pytest.mark.parametrize("temperature", ["nan", "inf"])
def test_generate_refuses_a_temperature_that_is_not_finite(lm_run, capsys, temperature):
    argv = ["generate", str(lm_run), "--max-new-tokens", "2", "--temperature", temperature]
    assert main(argv) == 2
    one_line_error(capsys, f"temperature {temperature} is not a finite value")


def test_generate_at_a_vanishing_temperature_is_greedy(lm_run, capsys):
    """logits / 1e-40 overflow to inf (softmax: nan); the limit of T -> 0 is the greedy choice."""
    texts = []
    for temperature in ("1e-40", "0"):
        argv = ["generate", str(lm_run), "--max-new-tokens", "6", "--temperature", temperature]
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_inference_folders_take_the_devices_a_run_takes(lm_run, tmp_path, capsys):
    quant = quantize_run(lm_run, "int8", out=tmp_path / "q").out
    capsys.readouterr()
    assert main(["eval", str(quant), "--device", "auto", "--max-batches", "1"]) == 0
    capsys.readouterr()
    for command in (["eval", str(quant)], ["generate", str(quant), "--max-new-tokens", "1"]):
        assert main([*command, "--device", "bogus"]) == 2
        one_line_error(capsys, "unknown device 'bogus'; fix: use auto, cpu, cuda or cuda:N")


def test_quantize_dot_writes_the_sibling_folder(lm_run, tmp_path, monkeypatch, capsys):
    run = shutil.copytree(lm_run, tmp_path / "run")
    monkeypatch.chdir(run)
    assert main(["quantize", ".", "--to", "int8"]) == 0
    assert load_source(tmp_path / "run-int8").quantized


def test_quantize_counts_the_original_linear_weights_in_the_checkpoint_dtype(tmp_path):
    """A bf16-pure run stores bf16 weights: the linear layers were 2 bytes per weight, not the 4
    of the fp32 model they are quantized from (nor more than the whole checkpoint)."""
    run = _train(
        tmp_path / "bf16", model="nano", recipe="bf16-pure", steps=1, seq_len=16, batch_size=2
    )
    manifest = quantize_run(run, "int8", out=tmp_path / "q").manifest
    weights = sum(
        layer.in_features * layer.out_features
        for layer in quant_layers(load_source(tmp_path / "q").model).values()
    )
    assert manifest["linear_bytes"]["original"] == 2 * weights
    assert manifest["linear_bytes"]["original"] < manifest["bytes"]["original"]


def test_exported_quantized_tied_head_is_untied_in_the_config(gpt2_run, tmp_path):
    """GPT-2 ties its head to the embedding; the int8 head is no longer the fp32 embedding, so
    the exported config must not ask a loader to tie them."""
    from transformers import AutoModelForCausalLM

    quant = quantize_run(gpt2_run, "int8", out=tmp_path / "q").out
    assert main(["export", str(quant), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_source(quant).model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    assert main(["export", str(gpt2_run), "--out", str(tmp_path / "dense")]) == 0  # still tied
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["tie_word_embeddings"]


def test_set_kernel_refuses_an_unknown_kernel(lm_run, tmp_path):
    model = load_source(quantize_run(lm_run, "int8", out=tmp_path / "q").out).model
    with pytest.raises(UsageError, match="unknown kernel 'int8_pack'"):
        set_kernel(model, "int8_pack")


def test_pruning_a_model_whose_only_linear_layer_is_its_head_names_the_head():
    from lowbit.infer.model import prune_model
    from lowbit.models.cnn import build_cnn

    with pytest.raises(UsageError, match=r"besides its output head \(head, kept dense\)"):
        prune_model(build_cnn(), sparsity=0.5)


def test_a_write_that_fails_leaves_the_earlier_folder_as_it_was(lm_run, tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) while quantize/export write: --out kept the earlier folder's files
    deleted by --force and a torn model.safetensors; now they are written aside, then moved."""
    import errno

    import safetensors.torch

    out = tmp_path / "q"
    quantize_run(lm_run, "int8", out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        quantize_run(lm_run, "int4", out=out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no staging folder left behind

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_hf(out, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_an_existing_out_is_written_through_itself_not_its_parent(lm_run, tmp_path, monkeypatch):
    """The folder the user named is writable, its parent (shared, root-owned, another mount) is
    not: the staging folder made beside --out failed. A staging folder a killed run left inside
    --out is no content: it is replaced, not refused."""
    import errno
    import tempfile

    out = tmp_path / "locked" / "pruned"
    (out / ".pruned.partial-killed").mkdir(parents=True)
    mkdtemp = tempfile.mkdtemp

    def parent_refuses(*args, dir=None, **kwargs):
        if Path(dir) == out.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", parent_refuses)
    assert main(["prune", str(lm_run), "--pattern", "2:4", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert load_source(out).manifest["pruning"]["rule"] == "2:4"
