"""Session 41: `lowbit quantize` and `lowbit prune` compare tensor bytes with tensor bytes.

Their size lines put the bytes of the source's tensors against the size of the written
model.safetensors, header and metadata included: the digits CNN's int8 folder read 1.83x smaller
where its tensors are 2.00x, and an fp32 run's pruned folder read larger than its run."""

import json

import pytest
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.infer.evaluate import size_change

STEPS = ["--steps", "1", "--eval-interval", "1", "--eval-batches", "1", "--quiet"]
RUNS = {
    "nano": ["--model", "nano", "--batch-size", "2", "--seq-len", "16"],
    "digits": ["--task", "image-classification", "--batch-size", "8"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("size")
    for name, argv in RUNS.items():
        assert main(["train", *argv, *STEPS, "--out", str(folder / name)]) == 0
    return folder


def stored(folder) -> int:
    """Bytes of the tensors an inference folder's model.safetensors holds."""
    return sum(t.nbytes for t in load_file(folder / "model.safetensors").values())


def sizes(folder) -> dict:
    return json.loads((folder / "quantization.json").read_text())["bytes"]


def checkpoint_bytes(run) -> int:
    """Bytes of the run's fp32 weights (its checkpoint's model state, a tied tensor once)."""
    from lowbit.infer.io import load_source

    model = load_source(run).model
    return sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


@pytest.mark.parametrize("name", list(RUNS))
def test_quantize_prints_the_ratio_of_the_tensors(runs, tmp_path, capsys, name):
    out = tmp_path / "q"
    assert main(["quantize", str(runs / name), "--to", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    size = sizes(out)
    assert size == {"original": checkpoint_bytes(runs / name), "quantized": stored(out)}
    assert f"MB, {size_change(size['original'], size['quantized'])} " in printed
    assert size["quantized"] < (out / "model.safetensors").stat().st_size  # the header left out


def test_an_fp32_runs_pruned_folder_is_as_large_as_its_run_and_quantizes_from_it(
    runs, tmp_path, capsys
):
    pruned, quantized = tmp_path / "p", tmp_path / "q"
    argv = ["prune", str(runs / "nano"), "--sparsity", "0.5", "--max-batches", "1"]
    assert main([*argv, "--out", str(pruned)]) == 0
    size = sizes(pruned)
    assert size["original"] == size["quantized"] == stored(pruned)
    mb = f"{size['original'] / 1e6:.3f} MB"
    assert f"fp32 weights {mb} -> {mb}, stored dense" in capsys.readouterr().out
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(quantized)]) == 0
    assert sizes(quantized) == {"original": stored(pruned), "quantized": stored(quantized)}
