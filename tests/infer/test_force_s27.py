"""Session 27: ``--force`` over an earlier export, quantized or pruned folder replaces exactly
what that wrote (weight shards and their index included), and nothing outside ``--out``; odd
``--out`` paths (a long name, a dangling link, ``.``), sources that are exports or files, and a
folder whose source was replaced."""

import json

import pytest
import torch

from lowbit.cli import main
from tests.infer.test_hunt_s24 import one_line_error


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _shards(folder):
    return sorted(p.name for p in folder.glob("model*.safetensors*"))


def test_force_replaces_an_earlier_exports_weight_shards(lm_run, tmp_path, capsys):
    """``export --force`` into a folder holding a sharded export left its
    model-0000N-of-0000M.safetensors and model.safetensors.index.json beside the new
    model.safetensors (or fewer new shards beside the old ones): anything that reads every
    *.safetensors file (vLLM, a Hub upload) took the old weights with the new. A quantize over
    the export kept them too. Now --force replaces them; the user's own files stay."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    export = ["export", str(lm_run), "--out", str(out)]
    capsys.readouterr()
    assert main([*export, "--max-shard-size", "100KB"]) == 0
    first = _shards(out)
    assert "model.safetensors.index.json" in first and len(first) > 3, first
    assert f" in {len(first) - 1} files" in capsys.readouterr().out
    (out / "README.md").write_text("my notes\n")

    assert main([*export, "--force"]) == 0
    assert _shards(out) == ["model.safetensors"]
    assert (out / "README.md").read_text() == "my notes\n"

    assert main([*export, "--force", "--max-shard-size", "100KB"]) == 0
    assert _shards(out) == first  # the single file is gone
    assert main([*export, "--force", "--max-shard-size", "200KB"]) == 0
    fewer = _shards(out)
    assert len(fewer) < len(first) and not set(fewer) & (set(first) - {fewer[-1]}), fewer
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(fewer) - {"model.safetensors.index.json"}
    model = AutoModelForCausalLM.from_pretrained(out)
    single = tmp_path / "single"
    assert main(["export", str(lm_run), "--out", str(single)]) == 0
    reference = AutoModelForCausalLM.from_pretrained(single)
    for (name, tensor), expected in zip(
        model.state_dict().items(), reference.state_dict().values()
    ):
        assert torch.equal(tensor, expected), name

    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out), "--force"]) == 0
    written = ["config.yaml", "model.safetensors", "quantization.json", "tokenizer"]
    assert _names(out) == ["README.md", *written]
    capsys.readouterr()


@pytest.mark.parametrize("size", ["abc", "5", "0GB", "-1GB", "0.0000001KB", "5 PB"])
def test_a_bad_max_shard_size_is_one_line_and_writes_nothing(lm_run, tmp_path, capsys, size):
    out = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(out), f"--max-shard-size={size}"]) == 2
    one_line_error(capsys, "--max-shard-size")
    assert not out.exists()


@pytest.mark.parametrize("listed", [["../notes.txt"], ["NOTES"], [3, "..", ""], "abc"])
def test_force_moves_nothing_outside_out_that_a_hand_edited_export_info_names(
    lm_run, tmp_path, capsys, listed
):
    """The tokenizer files an export's lowbit_export.json lists were taken as they were: a list
    edited to name ``../notes.txt`` (or its absolute path) made ``--force`` move that file,
    outside ``--out``, away and delete it; a number in the list was a traceback."""
    out = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(out)]) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    info = json.loads((out / "lowbit_export.json").read_text())
    info["tokenizer_files"] = [str(notes)] if listed == ["NOTES"] else listed
    (out / "lowbit_export.json").write_text(json.dumps(info))
    assert main(["export", str(lm_run), "--out", str(out), "--force"]) == 0
    assert notes.read_text() == "keep me\n"
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()


def test_eval_of_a_folder_whose_pruned_source_was_replaced_by_an_export(lm_run, tmp_path, capsys):
    """``lowbit eval`` of a folder quantized from a pruned folder failed once ``export --force``
    had replaced that pruned folder ("a Hugging Face model folder, not a lowbit run folder"),
    though only the optional reference was gone; now it evaluates the folder and says why there
    is no reference."""
    pruned, quantized = tmp_path / "pruned", tmp_path / "q"
    assert main(["prune", str(lm_run), "--sparsity", "0.5", "--out", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(quantized)]) == 0
    assert main(["export", str(lm_run), "--out", str(pruned), "--force"]) == 0
    capsys.readouterr()
    assert main(["eval", str(quantized), "--max-batches", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "baseline" not in result and result["loss"] > 0, result
    assert main(["eval", str(quantized), "--max-batches", "1"]) == 0
    assert "is no longer a quantized/pruned folder" in capsys.readouterr().out


def test_an_out_name_near_the_length_limit_is_written_and_replaced(lm_run, tmp_path, capsys):
    """A 250-character --out (a valid folder name) failed with "File name too long" naming a
    hidden ``.<name>.partial-...`` folder the user never typed: the folder written aside took the
    name whole. Now that name is cut to fit."""
    out = tmp_path / ("x" * 250)
    for force in ([], ["--force"]):
        assert main(["export", str(lm_run), "--out", str(out), *force]) == 0, capsys.readouterr()
        assert (out / "model.safetensors").is_file()
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out), "--force"]) == 0
    assert _names(out) == ["config.yaml", "model.safetensors", "quantization.json", "tokenizer"]
    assert _names(tmp_path) == [out.name]
    capsys.readouterr()


def test_an_out_that_is_a_dangling_symlink_is_one_line(lm_run, tmp_path, capsys):
    """--out naming a symbolic link to a folder that does not exist failed after the export was
    written with "Not a directory" naming the hidden folder it was written into."""
    link = tmp_path / "hf"
    link.symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    assert main(["export", str(lm_run), "--out", str(link)]) == 2
    one_line_error(capsys, "is a symbolic link to")
    assert _names(tmp_path) == ["hf"]
    (tmp_path / "nowhere").mkdir()
    assert main(["export", str(lm_run), "--out", str(link)]) == 0
    assert (tmp_path / "nowhere" / "model.safetensors").is_file()
    capsys.readouterr()


def test_an_interrupted_force_puts_back_a_file_the_new_folder_would_replace(
    lm_run, tmp_path, monkeypatch, capsys
):
    """A file of the quantized folder that is none of quantize's own but has a name an export
    writes (here lowbit_tokenizer.json) was overwritten as the export's files moved in, and a
    Ctrl-C before the export was complete left the export's copy in its place: --force promises
    the earlier folder back as it was."""
    import os

    out = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 0
    (out / "lowbit_tokenizer.json").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    replace = os.replace

    def interrupted_at_the_manifest(src, dst):
        if os.path.basename(dst) == "lowbit_export.json" and os.path.dirname(dst) == str(out):
            monkeypatch.setattr(os, "replace", replace)  # Ctrl-C once: moving back works
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_at_the_manifest)
    assert main(["export", str(lm_run), "--out", str(out), "--force"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _names(out) == [*sorted(before), "tokenizer"]
    assert main(["export", str(lm_run), "--out", str(out), "--force"]) == 0
    assert (out / "lowbit_tokenizer.json").read_text() != "mine\n"
    capsys.readouterr()


def test_an_interrupted_force_is_found_again_through_out_dot(lm_run, tmp_path, monkeypatch, capsys):
    """The hidden folder holding the files an interrupted ``--force`` into ``q`` could not move
    back (``q/.q.previous-...``) was looked for under the name ``--out`` spelled: ``--out .``
    from inside ``q`` missed it and called the folder's files ones no lowbit command wrote
    ("choose another --out"), never naming where the earlier files were."""
    out = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 0
    previous = out / ".q.previous-x1y2z3"
    previous.mkdir()
    (out / "quantization.json").rename(previous / "quantization.json")
    monkeypatch.chdir(out)
    capsys.readouterr()
    assert main(["quantize", str(lm_run), "--to", "int4", "--out", ".", "--force"]) == 2
    one_line_error(capsys, f"{previous.name} holds the files of the folder an interrupted --force")
    assert (previous / "quantization.json").is_file()


def test_an_export_or_a_file_given_as_the_source_names_what_it_is(lm_run, tmp_path, capsys):
    """quantize, prune or export of an export folder said "a Hugging Face model folder, not a
    lowbit run folder; fix: evaluate the run it came from", without naming that run, which the
    export records; a file given as the source was "no such folder"."""
    out = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(out)]) == 0
    capsys.readouterr()
    for command in (
        ["quantize", str(out), "--to", "int8", "--out", str(tmp_path / "q")],
        ["prune", str(out), "--sparsity", "0.5", "--out", str(tmp_path / "p")],
        ["export", str(out), "--out", str(tmp_path / "hf2")],
    ):
        assert main(command) == 2
        one_line_error(
            capsys,
            f"that lowbit export wrote, not a run or a quantized/pruned folder; "
            f"fix: give the folder it was exported from, {lm_run.resolve()}",
        )
    assert main(["quantize", str(lm_run / "config.yaml"), "--to", "int8"]) == 2
    one_line_error(capsys, "config.yaml: a file, not a folder")
    assert _names(tmp_path) == ["hf"]


def test_a_sparsity_is_named_as_given_not_rounded_to_a_whole_percent(lm_run, tmp_path, capsys):
    """--sparsity 0.504 wrote RUN_DIR-sparse50, the folder of --sparsity 0.5, which --force then
    replaced, and 0.99999 was recorded and printed as "100% unstructured"."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    for sparsity in ("0.5", "0.504", "0.99999"):
        assert main(["prune", str(run), "--sparsity", sparsity]) == 0
    capsys.readouterr()
    assert _names(tmp_path) == ["run", "run-sparse50", "run-sparse50.4", "run-sparse99.999"]
    manifest = json.loads((tmp_path / "run-sparse99.999" / "quantization.json").read_text())
    assert manifest["pruning"]["rule"] == "99.999% unstructured"
