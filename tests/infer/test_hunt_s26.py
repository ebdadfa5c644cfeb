"""Session 26's hunt through the inference commands: sizes printed against what quantize, prune
and export start from (a bf16-low run's fp32 master weights), and odd arguments."""

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.infer import evaluate_inference_dir, load_source, quantize_run
from tests.infer.conftest import _train
from tests.infer.test_hunt_s24 import one_line_error


@pytest.fixture(scope="module")
def low_run(tmp_path_factory):
    """A nano Llama trained one step in bf16-low: bf16 parameters, fp32 master weights."""
    folder = tmp_path_factory.mktemp("low") / "run"
    return _train(folder, model="nano", recipe="bf16-low", steps=1, seq_len=16, batch_size=2)


def test_sizes_are_those_of_the_fp32_master_weights_quantized_pruned_and_exported(
    low_run, tmp_path, capsys
):
    """quantize starts from a bf16-low run's fp32 master weights, but printed (and recorded) the
    16-bit parameters' bytes as the original: the int8 folder looked 1.5x smaller than what it
    was quantized from, not 3x. Every step now names what it started from, with its size."""
    masters = load_source(low_run).model  # fp32, the masters loaded
    fp32_bytes = sum(t.nbytes for t in masters.state_dict().values())
    assert main(["quantize", str(low_run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert manifest["bytes"]["original"] == fp32_bytes
    assert f"fp32 master weights {fp32_bytes / 1e6:.3f} MB -> " in printed
    linear = [m for m in masters.modules() if isinstance(m, torch.nn.Linear)]
    assert manifest["linear_bytes"]["original"] == sum(m.weight.nbytes for m in linear)
    assert main(["prune", str(low_run), "--pattern", "2:4", "--out", str(tmp_path / "p")]) == 0
    assert f"fp32 master weights {fp32_bytes / 1e6:.3f} MB -> " in capsys.readouterr().out
    argv = ["export", str(low_run), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]
    assert main(argv) == 0
    assert "weights: fp32 master weights written as bf16" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "q"), "--max-batches", "1"]) == 0
    assert f"size: fp32 master weights {fp32_bytes / 1e6:.3f} MB -> " in capsys.readouterr().out


def test_a_bf16_pure_runs_pruned_folder_is_printed_as_twice_its_checkpoint(tmp_path, capsys):
    """A pruned folder is stored in fp32: `prune` said its size was unchanged, and of a bf16-pure
    run (bf16 weights) it is twice the checkpoint's."""
    run = _train(tmp_path / "run", model="nano", recipe="bf16-pure", steps=1, seq_len=16)
    assert main(["prune", str(run), "--sparsity", "0.5", "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "p" / "quantization.json").read_text())
    size = manifest["bytes"]
    assert size["quantized"] > 1.9 * size["original"]
    assert f"bf16 weights {size['original'] / 1e6:.3f} MB -> {size['quantized'] / 1e6:.3f}" in (
        printed
    )


def test_evaluate_inference_dir_refuses_a_negative_count_as_lowbit_eval_does(lm_run, tmp_path):
    """`lowbit.infer.evaluate_inference_dir(max_batches=-1)` was a traceback from deep in the
    data loader. (0 is every batch in both since session 36: tests/infer/test_followups_s36.py.)"""
    quant = quantize_run(lm_run, "int8", out=tmp_path / "q").out
    with pytest.raises(UsageError, match="--max-batches -1 is negative; fix: use 1 or more"):
        evaluate_inference_dir(quant, max_batches=-1)


def test_eval_max_batches_names_the_flag_and_its_value(lm_run, capsys):
    assert main(["eval", str(lm_run), "--max-batches", "-2"]) == 2
    one_line_error(capsys, "--max-batches -2 is negative; fix: use 1 or more")


def test_a_tied_head_and_embedding_count_once_in_the_original_size(gpt2_run, tmp_path):
    """GPT-2's head is its embedding: the checkpoint stores the tensor once, but the original
    size counted it under both names, and the folder looked that much smaller."""
    model = load_source(gpt2_run).model
    assert model.lm_head.weight is model.transformer.wte.weight
    manifest = quantize_run(gpt2_run, "int8", out=tmp_path / "q").manifest
    assert manifest["bytes"]["original"] == sum(p.nbytes for p in model.parameters())


def test_a_folder_larger_than_its_source_is_not_printed_as_smaller(low_run, tmp_path, capsys):
    """int4 in groups of 1 stores an fp32 scale per weight: the file grows, and quantize printed
    "0.89x smaller"."""
    argv = ["quantize", str(low_run), "--to", "int4", "--group-size", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    size = json.loads((tmp_path / "quantization.json").read_text())["bytes"]
    assert size["quantized"] > size["original"]
    assert f"{size['quantized'] / size['original']:.2f}x larger" in capsys.readouterr().out
