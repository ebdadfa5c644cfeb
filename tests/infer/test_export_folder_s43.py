"""Session 43: a `lowbit export` folder that `lowbit train --model` fine-tunes from is refused in
one line where its files no longer fit together: a config.json whose sizes the weights do not
have was a transformers traceback, one of more or fewer layers fine-tuned from layers drawn
afresh (or dropped) under transformers' table of keys, and a folder that lost its weights file
trained from a fresh initialization without a word."""

from __future__ import annotations

import json
import shutil

import pytest

from lowbit.cli import main

TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--quiet"]


@pytest.fixture(scope="module")
def exported(lm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export43") / "hf"
    assert main(["export", str(lm_run), "--out", str(out)]) == 0
    return out


def _copy(exported, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(exported, folder)
    return folder


def _edit_config(folder, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _fine_tune(folder, tmp_path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", "--model", str(folder), *TRAIN, "--out", str(tmp_path / "ft")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("export_record", [True, False])
def test_a_config_of_other_sizes_than_the_weights_is_refused_naming_a_tensor(
    exported, tmp_path, capsys, export_record
):
    """In any --model folder: without lowbit_export.json it is a plain save_pretrained folder."""
    folder = _copy(exported, tmp_path)
    if not export_record:
        (folder / "lowbit_export.json").unlink()
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    _edit_config(folder, hidden_size=2 * hidden)
    code, err = _fine_tune(folder, tmp_path, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lowbit: error: {folder / 'config.json'}: does not fit"), err
    # a tensor named (the embedding or the head), its shape in the file and the config's
    shapes = f".weight is [257, {hidden}] in model.safetensors, [257, {2 * hidden}] in the config"
    assert shapes in err and ("lm_head" in err or "embed_tokens" in err), err
    # the fix the docs promise: an export's own config comes back by exporting again
    fix = "that lowbit export wrote (lowbit export" if export_record else "saved with these weights"
    assert f"fix: restore the config.json {fix}" in err, err
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("change", [-1, 1])
def test_an_exports_config_of_other_layers_is_refused_naming_the_keys(
    exported, tmp_path, capsys, change
):
    folder = _copy(exported, tmp_path)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    _edit_config(folder, num_hidden_layers=layers + change)
    code, err = _fine_tune(folder, tmp_path, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "LOAD REPORT" not in err, err
    assert err.startswith(f"lowbit: error: {folder / 'config.json'}: does not fit"), err
    which = "not in the weights" if change > 0 else "in the weights but not in the model"
    assert which in err and f"model.layers.{max(layers, layers + change) - 1}." in err, err
    assert "fix: restore the config.json that lowbit export wrote" in err, err


def test_an_export_that_lost_its_weights_is_refused_not_trained_afresh(
    exported, lm_run, tmp_path, capsys
):
    """Refused for a new run; a run fine-tuned from it before evaluates as ever (its checkpoint
    holds its weights: a folder's weights changed since are fine, docs/inference.md)."""
    folder = _copy(exported, tmp_path)
    tuned = tmp_path / "tuned"
    assert main(["train", "--model", str(folder), *TRAIN, "--out", str(tuned)]) == 0
    (folder / "model.safetensors").unlink()
    code, err = _fine_tune(folder, tmp_path, capsys)
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert f"{folder}: lowbit_export.json lists model.safetensors, not in the" in err, err
    assert f"lowbit export {lm_run} --out {folder} --force" in err, err
    assert f"{folder / 'config.json'} alone" in err, err  # what trains the architecture afresh
    assert not (tmp_path / "ft").exists()
    assert main(["eval", str(tuned), "--max-batches", "1", "--quiet"]) == 0


def test_a_sharded_export_that_lost_its_index_is_refused_naming_it(lm_run, tmp_path, capsys):
    folder = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(folder), "--max-shard-size", "1MB"]) == 0
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    (folder / "model.safetensors.index.json").unlink()
    code, err = _fine_tune(folder, tmp_path, capsys)
    assert code == 2, err
    assert "lowbit_export.json lists model.safetensors.index.json, not in the folder" in err, err


def test_an_intact_export_fine_tunes(exported, tmp_path, capsys):
    code, err = _fine_tune(_copy(exported, tmp_path), tmp_path, capsys)
    assert code == 0, err


def test_the_fix_exports_again_in_the_dtype_recorded(lm_run, tmp_path, capsys):
    """`--force` alone wrote fp32 over a bf16 export."""
    folder = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(folder), "--dtype", "bf16"]) == 0
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    _edit_config(folder, num_hidden_layers=layers + 1)
    code, err = _fine_tune(folder, tmp_path, capsys)
    assert code == 2, err
    assert err.rstrip().endswith(f"lowbit export {lm_run} --out {folder} --force --dtype bf16)"), (
        err
    )


def _conll(tmp_path):
    data = tmp_path / "conll"
    data.mkdir()
    sentence = ["Anna B-PER", "lives O", "in O", "Rome B-LOC", ". O", ""]
    for split in ("train", "validation", "test"):
        (data / f"{split}.txt").write_text("\n".join(sentence * 4))
    return data


def _tag(folder, tmp_path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    tagger = ["train", "--task", "token-classification", "--data", str(_conll(tmp_path))]
    code = main([*tagger, "--model", str(folder), *TRAIN, "--out", str(tmp_path / "ft")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers"])
def test_a_tagger_from_an_export_of_another_config_is_refused(
    exported, lm_run, tmp_path, capsys, field
):
    """A token classifier loads the encoder with ignore_mismatched_sizes (for a head of other
    labels): a size edited trained the whole encoder from random values, a layer added trained it
    afresh, each under a warning only."""
    folder = _copy(exported, tmp_path)
    value = json.loads((folder / "config.json").read_text())[field]
    _edit_config(folder, **{field: 2 * value})
    code, err = _tag(folder, tmp_path, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "warning" not in err, err
    assert err.startswith(f"lowbit: error: {folder / 'config.json'}: does not fit"), err
    said = "in the weights, [" if field == "hidden_size" else f"model.layers.{value}."
    assert said in err and "classifier" not in err and "score" not in err, err
    assert f"(lowbit export {lm_run} --out {folder} --force)" in err, err
    assert not (tmp_path / "ft").exists()


def test_a_tagger_fine_tunes_from_an_intact_export_with_a_new_head(exported, tmp_path, capsys):
    code, err = _tag(_copy(exported, tmp_path), tmp_path, capsys)
    assert code == 0, err
    assert "drawn afresh" not in err and "did not use" not in err, err
