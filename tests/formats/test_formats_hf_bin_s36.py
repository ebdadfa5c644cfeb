"""`lowbit formats --tensor` on a Hugging Face folder whose weights are ``pytorch_model.bin`` (the
format transformers saved before safetensors, still what many published checkpoints hold): it
was refused as "a folder, with no .safetensors file in it", naming no file to pass (session 36)."""

import json

import torch

from lowbit.cli import main
from lowbit.formats import quantize
from lowbit.formats.error import sqnr


def rows(out: str) -> dict[str, list[str]]:
    """The SQNR table's cells by tensor name (its title and header are the first two lines)."""
    lines = [line.split() for line in out.splitlines()[2:] if not line.startswith("note:")]
    return {line[0]: line[1:] for line in lines}


def test_a_folder_of_pytorch_model_bin_shards_is_measured(tmp_path, capsys):
    first = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    second = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).half()
    torch.save({"a.weight": first}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": second}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin"}}
    index["weight_map"]["b.weight"] = "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    torch.save({"learning_rate": 1e-4}, tmp_path / "training_args.bin")  # no weights: not read
    assert main(["formats", "--tensor", str(tmp_path)]) == 0
    table = rows(capsys.readouterr().out)
    assert list(table) == ["a.weight", "b.weight"]
    mx = sqnr(first, quantize(first, "fp4_e2m1", "mx").dequantize())
    assert table["a.weight"][9] == f"{mx:.2f}"  # the fp4_e2m1/mx column


def test_a_folder_with_one_pytorch_model_bin_is_measured(tmp_path, capsys):
    torch.save({"w": torch.randn(8, 64)}, tmp_path / "pytorch_model.bin")
    assert main(["formats", "--tensor", str(tmp_path)]) == 0
    assert list(rows(capsys.readouterr().out)) == ["w"]
