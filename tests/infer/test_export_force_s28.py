"""Session 28: ``--force`` over an earlier export, quantized or pruned folder moves away what that
folder wrote, known by name (an export's own list of its files), never a user's file that only
looks like one of them."""

import json

import pytest

from lowbit.cli import main

SHARD = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize("earlier", ["export", "quantize", "prune"])
def test_force_keeps_a_users_file_named_like_a_weight_shard(lm_run, tmp_path, capsys, earlier):
    """--force took every ``model-N-of-M.safetensors`` in --out for an earlier export's shard, by
    its name alone: a user's file of that name beside an unsharded export, or beside a quantized
    or pruned folder (which never shards), was moved away and deleted."""
    out = tmp_path / "out"
    make = {
        "export": ["export", str(lm_run)],
        "quantize": ["quantize", str(lm_run), "--to", "int8"],
        "prune": ["prune", str(lm_run), "--sparsity", "0.5"],
    }[earlier]
    assert main([*make, "--out", str(out)]) == 0
    (out / SHARD).write_bytes(b"my own weights")
    assert main(["export", str(lm_run), "--out", str(out), "--force"]) == 0
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out), "--force"]) == 0
    assert (out / SHARD).read_bytes() == b"my own weights"
    capsys.readouterr()


def test_force_replaces_exactly_the_files_an_export_lists(lm_run, tmp_path, capsys):
    """An export lists every file it wrote (lowbit_export.json's ``files``): --force over it moved
    away besides those every name a quantized folder writes (config.yaml, labels.json, ...), a
    user's own config.yaml beside the export included."""
    out = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(out)]) == 0
    (out / "config.yaml").write_text("mine: 1\n")
    (out / "labels.json").write_text("[]\n")
    assert main(["export", str(lm_run), "--out", str(out), "--force", "--dtype", "bf16"]) == 0
    assert (out / "config.yaml").read_text() == "mine: 1\n"
    assert (out / "labels.json").read_text() == "[]\n"
    assert json.loads((out / "lowbit_export.json").read_text())["dtype"] == "bf16"
    capsys.readouterr()


def test_force_over_an_export_without_a_file_list_replaces_the_shards_its_index_names(
    lm_run, tmp_path, capsys
):
    """An export written before lowbit_export.json listed its files (session 27) names its weight
    shards in transformers' model.safetensors.index.json: --force replaces those, and leaves a
    file of a shard's name that the index does not name."""
    out = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    info = json.loads((out / "lowbit_export.json").read_text())
    shards = [name for name in info.pop("files") if name.startswith("model-")]
    (out / "lowbit_export.json").write_text(json.dumps(info))
    assert len(shards) > 2 and SHARD not in shards, shards
    (out / SHARD).write_bytes(b"my own weights")
    assert main(["export", str(lm_run), "--out", str(out), "--force"]) == 0
    left = sorted(p.name for p in out.glob("model*.safetensors*"))
    assert left == [SHARD, "model.safetensors"], left
    capsys.readouterr()
