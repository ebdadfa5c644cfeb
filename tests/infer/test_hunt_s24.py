"""Session 24's hunt through the inference commands: data edited under a run, damaged model
folders, and an interrupted ``--force``."""

from lowbit.cli import main
from tests.infer.conftest import _train


def one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert message in err, err
    return err.strip()


def test_prune_does_not_compare_on_data_edited_since_the_run(tmp_path, capsys):
    """The run's data edited (not deleted) after training: prune compared the pruned and the
    unpruned model on the new contents, which `lowbit eval` refuses; now it writes the folder and
    says the evaluation was not done, naming the changed data, as for data that is gone."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(200):  # ~5% of documents land in validation: enough for a non-empty split
        (data / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 4)
    run = _train(tmp_path / "run", model="nano", data=str(data), steps=1, seq_len=32, batch_size=4)
    (data / "7.txt").write_text("def g(x):\n    return x - 7\n")
    capsys.readouterr()
    assert main(["prune", str(run), "--pattern", "2:4", "--max-batches", "1"]) == 0
    out, err = capsys.readouterr()
    assert "reference = the unpruned run" not in out
    assert "not evaluated" in err and "holds other contents than the run trained on" in err
    assert (tmp_path / "run-2of4" / "quantization.json").is_file()


def _llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _bin_folder(folder, legacy=False):
    """A 1-layer Llama whose weights are a ``pytorch_model.bin`` (torch.save's zip archive, or
    its legacy pickle format)."""
    import torch

    model = _llama()
    folder.mkdir()
    model.config.save_pretrained(folder)
    zip_format = {"_use_new_zipfile_serialization": not legacy}
    torch.save(model.state_dict(), folder / "pytorch_model.bin", **zip_format)
    return folder


def test_a_truncated_pytorch_model_bin_is_one_line_naming_it(tmp_path, capsys):
    """A pytorch_model.bin cut short (a copy that stopped) gave torch's zip reader's traceback,
    "OSError: [Errno 22] Invalid argument", naming no file; so did a file that is no torch.save
    output at all (a saved error page). A legacy (pickle) file still trains."""
    settings = ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
    legacy = _bin_folder(tmp_path / "legacy", legacy=True)
    out = tmp_path / "run"
    assert main(["train", "--model", str(legacy), "--out", str(out), *settings]) == 0
    folder = _bin_folder(tmp_path / "model")
    weights = folder / "pytorch_model.bin"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    capsys.readouterr()
    assert main(["train", "--model", str(folder), "--out", str(tmp_path / "r2"), *settings]) == 2
    one_line_error(capsys, f"{weights}: a zip archive without the directory at its end: cut short")
    weights.write_text("<html>502 Bad Gateway</html>")
    assert main(["train", "--model", str(folder), "--out", str(tmp_path / "r3"), *settings]) == 2
    one_line_error(capsys, f"{weights}: not a file torch.save wrote (a text file); fix: copy it")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_an_interrupted_force_leaves_the_earlier_folder_or_names_where_it_is(
    lm_run, tmp_path, monkeypatch, capsys
):
    """``--force`` into an existing folder deleted the earlier files before moving the new ones
    in, and removed the staging folder when a move failed: Ctrl-C there lost both. Now the
    earlier files wait in a hidden folder until the new ones are in: an interruption puts them
    back, and where even that fails the error names the hidden folder, which the next run
    names too instead of writing past it."""
    import errno
    import os

    out = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 0
    before = _files(out)
    replace = os.replace

    def interrupted_at_the_manifest(src, dst):
        if os.path.basename(dst) == "quantization.json" and os.path.dirname(dst) == str(out):
            monkeypatch.setattr(os, "replace", replace)  # Ctrl-C once: moving back works
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_at_the_manifest)
    command = ["quantize", str(lm_run), "--to", "int4", "--out", str(out), "--force"]
    assert main(command) == 130
    assert _files(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    def failing_once_the_new_files_move_in(src, dst):
        if os.path.dirname(dst) == str(out):
            raise OSError(errno.EIO, "Input/output error")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_once_the_new_files_move_in)
    capsys.readouterr()
    assert main(command) == 2
    (previous,) = [p for p in out.iterdir() if p.name.startswith(".q.previous-")]
    one_line_error(capsys, f"could not be moved back; they are in {previous}; fix: move them")
    assert _files(previous) == before
    monkeypatch.setattr(os, "replace", replace)
    assert main(command) == 2
    one_line_error(capsys, f"{previous.name} holds the files of the folder an interrupted --force")
    for item in previous.iterdir():
        item.rename(out / item.name)
    previous.rmdir()
    assert main(command) == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_shard_missing_from_a_model_folder_is_one_line_naming_it(tmp_path, capsys):
    """A sharded checkpoint copied without one of its shards gave transformers' traceback."""
    folder = tmp_path / "model"
    _llama().save_pretrained(folder, max_shard_size="50KB")
    (gone,) = [p for p in folder.glob("model-00001-of-*.safetensors")]
    gone.unlink()
    settings = ["--steps", "1", "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(["train", "--model", str(folder), *settings]) == 2
    one_line_error(
        capsys,
        f"model.safetensors.index.json lists 1 shard(s) that are not in the "
        f"folder ({gone.name}); fix: copy them too",
    )
    assert not (tmp_path / "run").exists()


def test_quantize_of_a_run_whose_model_folder_changed_is_one_line(tmp_path, capsys):
    """The --model folder a run trained from re-saved with another architecture: quantize, prune
    and export gave load_state_dict's traceback; now one line names the checkpoint and the
    folder to restore."""
    import json

    folder = tmp_path / "model"
    _llama().save_pretrained(folder)
    run = tmp_path / "run"
    settings = ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
    assert main(["train", "--model", str(folder), "--out", str(run), *settings]) == 0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    (folder / "model.safetensors").unlink()  # a fresh model of the new shape
    capsys.readouterr()
    for command in (
        ["quantize", str(run), "--to", "int8"],
        ["prune", str(run), "--sparsity", "0.5"],
        ["export", str(run), "--out", str(tmp_path / "hf")],
    ):
        assert main(command) == 2
        one_line_error(capsys, f"its weights do not fit the model {folder} builds now (size")
    for command in (["eval", str(run)], ["generate", str(run), "--max-new-tokens", "2"]):
        assert main(command) == 2  # the whole shape in the message, and the folder to restore
        message = one_line_error(capsys, "its weights do not fit the model of")
        assert "the shape in current model is torch.Size([96, 32])" in message
        assert message.endswith(f"fix: restore {folder} as the run trained from it")
    assert [p.name for p in tmp_path.iterdir()] == ["model", "run"]
