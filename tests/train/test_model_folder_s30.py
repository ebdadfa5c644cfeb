"""Session 30: a run trained from a local --model folder whose config.json (or, for a token
classifier, tokenizer) changed since is refused in one line by every command that loads it
(resume, eval, generate, quantize, export), since each rebuilds the architecture from the folder
and loads a checkpoint into it; weights changed in the folder are fine (the checkpoint holds the
trained ones), and runs recorded before run.json held the folder's record load as before."""

import json

import pytest

from lowbit.cli import main
from tests.llama import save_llama

TINY = ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--quiet"]


def edit_config(folder, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture
def llama_run(tmp_path):
    """A 2-step causal-lm run trained from a tiny Llama folder: (model folder, run folder)."""
    model, run = tmp_path / "model", tmp_path / "run"
    save_llama(model)
    assert main(["train", "--model", str(model), *TINY, "--steps", "2", "--out", str(run)]) == 0
    return model, run


def eval_loss(run, capsys) -> float:
    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]


def refusal(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # transformers' "Loading weights" progress bar may come before it, as in any load
    lines = [line for line in err.splitlines() if line and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    return lines[0]


ROPE = {"rope_type": "default", "rope_theta": 10000.0}  # transformers 5 keeps rope_theta here


def test_a_changed_config_is_refused_by_quantize_export_and_resume(llama_run, capsys):
    """Another rope_theta: quantize and export loaded the checkpoint into a model of the edited
    config without a word (another model's outputs, an export that names the wrong rope_theta);
    a resume continued training in it."""
    model, run = llama_run
    before = eval_loss(run, capsys)
    edit_config(model, rope_parameters={**ROPE, "rope_theta": 500000.0})
    commands = [
        ["quantize", str(run), "--to", "int8", "--out", str(run.parent / "q")],
        ["export", str(run), "--out", str(run.parent / "hf")],
        ["train", "--resume", str(run), "--steps", "3", "--quiet"],
    ]
    for argv in commands:
        err = refusal(argv, capsys)
        assert f"the --model folder {model} changed since the run trained from it" in err
        assert "config.json rope_parameters.rope_theta 10000.0 -> 500000.0" in err and "fix:" in err
    assert not (run.parent / "q").exists() and not (run.parent / "hf").exists()
    assert json.loads((run / "run.json").read_text())["step"] == 2  # the resume wrote nothing
    edit_config(model, rope_parameters=ROPE)  # put back as it was: the run loads as before
    assert eval_loss(run, capsys) == before
    assert main(["export", str(run), "--out", str(run.parent / "hf")]) == 0


def test_a_changed_config_is_refused_by_eval_and_generate(llama_run, capsys):
    model, run = llama_run
    edit_config(model, rope_parameters={**ROPE, "rope_theta": 500000.0})
    for argv in (
        ["eval", str(run), "--max-batches", "1"],
        ["generate", str(run), "--max-new-tokens", "2"],
    ):
        err = refusal(argv, capsys)
        assert "config.json rope_parameters.rope_theta 10000.0 -> 500000.0" in err


def test_another_vocabulary_is_one_line_not_a_shape_mismatch(llama_run, capsys):
    model, run = llama_run
    edit_config(model, vocab_size=320)
    err = refusal(["train", "--resume", str(run), "--steps", "3", "--quiet"], capsys)
    assert "config.json vocab_size 300 -> 320" in err


def test_only_the_weights_changed_is_fine_and_quiet(llama_run, capsys):
    """The checkpoint holds every trained weight: weights trained again into the folder, a
    folder saved again by another transformers version, or another end-of-text id (where
    generation stops, not the network) change nothing the run loads."""
    model, run = llama_run
    before = eval_loss(run, capsys)
    save_llama(model, seed=1)
    edit_config(model, transformers_version="0.0.1", eos_token_id=3)
    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["loss"] == before
    assert "warning" not in err
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0


def test_a_quantized_folder_of_the_run_is_checked_too(llama_run, capsys):
    model, run = llama_run
    assert main(["quantize", str(run), "--to", "int8", "--out", str(run.parent / "q")]) == 0
    edit_config(model, hidden_act="gelu")
    err = refusal(["eval", str(run.parent / "q"), "--max-batches", "1"], capsys)
    assert 'config.json hidden_act "silu" -> "gelu"' in err


def test_runs_recorded_before_the_model_record_load_as_before(llama_run, capsys):
    model, run = llama_run
    info = json.loads((run / "run.json").read_text())
    assert info["model_record"]["config"]["rope_parameters"]["rope_theta"] == 10000.0
    del info["model_record"]
    (run / "run.json").write_text(json.dumps(info))
    edit_config(model, rope_parameters={**ROPE, "rope_theta": 500000.0})
    assert main(["quantize", str(run), "--to", "int8", "--out", str(run.parent / "q")]) == 0


def test_a_token_classifier_is_refused_after_its_folder_tokenizer_changed(tmp_path, capsys):
    """A token classifier reads its tokenizer from the --model folder at each load: another
    vocab.txt gave the same words other ids, evaluated without a word."""
    from tests.train.test_pretrained_transfer import WORDS, save_tiny_bert
    from tests.train.test_run_data import _conll_folder

    model, run = save_tiny_bert(tmp_path / "bert", WORDS), tmp_path / "run"
    # a few CoNLL sentences: the built-in task tags and encodes a source tree first (seconds)
    data = _conll_folder(tmp_path / "conll", sentences=4)
    argv = ["train", "--task", "token-classification", "--model", str(model), "--data", str(data)]
    argv += TINY
    assert main([*argv, "--steps", "2", "--out", str(run)]) == 0
    file = model / "tokenizer.json"
    tokenizer = json.loads(file.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["def"], vocab["return"] = vocab["return"], vocab["def"]
    file.write_text(json.dumps(tokenizer))
    err = refusal(["quantize", str(run), "--to", "int8", "--out", str(tmp_path / "q")], capsys)
    assert "tokenizer.json changed" in err


def test_a_config_saved_again_by_transformers_is_no_change(tmp_path, capsys):
    """The raw config.json was compared: a transformers-4 config (top-level rope_theta, defaults
    left out), saved again by this transformers (rope_parameters, defaults written out), read as
    a dozen changed fields, and every later load of the run was refused."""
    from transformers import AutoConfig

    model, run = tmp_path / "model", tmp_path / "run"
    model.mkdir()
    v4 = {
        "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
        "rope_theta": 10000.0, "rope_scaling": None, "transformers_version": "4.46.0",
    }  # fmt: skip
    (model / "config.json").write_text(json.dumps(v4))
    assert main(["train", "--model", str(model), *TINY, "--steps", "1", "--out", str(run)]) == 0
    AutoConfig.from_pretrained(model).save_pretrained(model)
    assert "rope_parameters" in json.loads((model / "config.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    edit_config(model, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert "rope_theta 10000.0 -> 500000.0" in refusal(["eval", str(run)], capsys)


def test_a_large_tokenizer_file_copied_back_unchanged_is_no_change(tmp_path):
    """Tokenizer files over 1 MiB were told apart by size and modification time: the same bytes
    copied back (cp without -p, a checkout) refused every load of a token classifier."""
    import os

    from lowbit.models.pretrained import model_changes, model_record

    save_llama(tmp_path)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"vocab": ["x" * 64] * 40_000}))  # about 2.7 MB
    recorded = model_record(tmp_path)
    stat = tokenizer.stat()
    os.utime(tokenizer, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_changes(recorded, tmp_path, tokenizer=True) == []
    tokenizer.write_text(json.dumps({"vocab": ["y" * 64] * 40_000}))
    assert model_changes(recorded, tmp_path, tokenizer=True) == ["tokenizer.json changed"]
