"""Session 42 (review R4 of the run_files check): a run's own files are checked before its task
reads them, so a foreign tokenizer of more ids is named as the run's file, not blamed on the
--model folder the run trained from; only the files the run's task reads are fingerprinted and
compared (a causal LM never reads a tagger's vocab.json); an added file's fix is to remove it."""

from __future__ import annotations

import json
import random

from lowbit.cli import main
from lowbit.data import build_tokenizer
from tests.llama import save_llama

TINY = ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--quiet"]
TINY += ["--recipe", "fp32", "--steps", "1"]


def _refusal(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def _nano_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "nano", *TINY, "--out", str(run)]) == 0
    return run


def test_a_larger_foreign_tokenizer_in_a_model_folder_run_is_named_as_the_runs_file(
    tmp_path, capsys
):
    """The run's byte tokenizer replaced by a BPE one of more ids than the folder's embedding
    was refused as the --model folder's: "fix: save the model's tokenizer into its folder", a fix
    that would have damaged the folder."""
    model, run = tmp_path / "model", tmp_path / "run"
    save_llama(model)  # 300 embedding rows, no tokenizer: the run trains on byte ids
    assert main(["train", "--model", str(model), *TINY, "--out", str(run)]) == 0
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(300)]
    foreign = build_tokenizer("bpe", [" ".join(rng.choice(words) for _ in range(3000))], 350)
    assert foreign.vocab_size > 300
    foreign.save(run / "tokenizer")
    for command in (["eval", str(run)], ["train", "--resume", str(run), "--steps", "2"]):
        line = _refusal(command, capsys)
        assert "the run's own files changed" in line and "tokenizer/" in line, line
        assert str(model) not in line and "into its folder" not in line, line


def test_a_causal_lm_run_ignores_a_taggers_files_it_never_reads(tmp_path, capsys):
    """A stray vocab.json (or labels.json) beside a causal LM's checkpoints was refused as
    "vocab.json added", though no load of the run reads it."""
    run = _nano_run(tmp_path)
    (run / "vocab.json").write_text('{"words": []}\n')
    (run / "labels.json").write_text('["O"]\n')
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    assert main(["quantize", str(run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["run_files"]
    assert main(["eval", str(tmp_path / "q"), "--max-batches", "1"]) == 0


def test_a_record_holding_names_the_task_does_not_read_compares_only_those_it_reads(
    tmp_path, capsys
):
    """A run.json written before this fix recorded a tagger's names for every run: a stray
    vocab.json then, gone now, was refused as "vocab.json removed"."""
    run = _nano_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    info["run_files"]["vocab.json"] = "sha256:" + "0" * 64
    (run / "run.json").write_text(json.dumps(info))
    assert main(["eval", str(run), "--max-batches", "1"]) == 0


def test_a_file_added_to_the_runs_tokenizer_is_refused_with_remove_it(tmp_path, capsys):
    """The fix said "put those back as they were" of a file that was never there."""
    run = _nano_run(tmp_path)
    (run / "tokenizer" / "vocab.json").write_text("{}\n")
    line = _refusal(["eval", str(run)], capsys)
    assert "(tokenizer/vocab.json added)" in line and "fix: remove it, or train" in line, line


def test_a_flag_with_the_value_edited_into_config_yaml_is_named_in_the_fix(tmp_path, capsys):
    """``--lr 0.001`` given with the run's config.yaml edited to ``lr: 0.001``: the fix said only
    to put the file back, and a resume that did (the flag kept) was refused again."""
    run = _nano_run(tmp_path)
    config = run / "config.yaml"
    saved = config.read_text()
    (line,) = [line for line in saved.splitlines() if line.startswith("lr: ")]
    config.write_text(saved.replace(line, "lr: 0.001"))
    refusal = _refusal(["train", "--resume", str(run), "--steps", "2", "--lr", "0.001"], capsys)
    assert f"fix: resume with {line} put back into its config.yaml and without --lr" in refusal
    config.write_text(saved)  # the fix, both halves of it
    assert main(["train", "--resume", str(run), "--steps", "2", "--quiet"]) == 0
