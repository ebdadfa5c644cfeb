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


def test_a_folder_without_weights_names_both_kinds_it_reads(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["formats", "--tensor", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"lowbit: error: {tmp_path}: a folder, with no .safetensors or pytorch_model.bin file in "
        "it; fix: pass a .pt or .safetensors file"
    )


def test_an_unreadable_shard_index_is_named(tmp_path, capsys):
    """It read as a folder of no weights ("no .safetensors file in it"), the shards beside it
    unnamed."""
    torch.save({"w": torch.randn(8, 64)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text('{"weight_map": ')  # cut short
    assert main(["formats", "--tensor", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lowbit: error: {index}: no index of shards lowbit can read"), line
    assert "fix: pass one of the shards (a pytorch_model-*.bin file)" in line
