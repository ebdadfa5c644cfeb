import json

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.memory.estimate import estimate
from lowbit.train.config import TASK_DEFAULTS, TrainConfig, write

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20


def _causal_lm_run(folder):
    """A run folder as `lowbit train --model nano --tokenizer bpe` leaves it: its settings and
    the BPE tokenizer it trained with (more ids than the size's byte vocabulary)."""
    from lowbit.data import build_tokenizer

    write(TrainConfig(task="causal-lm", model="nano", tokenizer="bpe", vocab_size=300), folder)
    tokenizer = build_tokenizer("bpe", TEXTS, 300)
    tokenizer.save(folder / "tokenizer")
    return tokenizer


def _tagger_run(folder):
    """A run folder as `lowbit train --task token-classification --model tiny` leaves it."""
    from lowbit.data.syntax_tags import WordVocab

    write(TrainConfig(task="token-classification", model="tiny"), folder)
    vocab = WordVocab([*WordVocab.SPECIALS, *(f"word{i}" for i in range(500))])
    vocab.save(folder / "vocab.json")
    labels = ["O", "B-NAME", "I-NAME", "B-STR"]
    (folder / "labels.json").write_text(json.dumps(labels))
    return vocab, labels


def test_a_run_folder_is_estimated_with_the_vocabulary_it_trained_with(tmp_path):
    # The estimate of a run folder used to build the size's default (byte) vocabulary: a BPE
    # run's embeddings and head were missing from every model-state figure.
    from lowbit.models import build_model

    tokenizer = _causal_lm_run(tmp_path)
    trained = build_model("causal-lm", "nano", vocab_size=tokenizer.vocab_size)
    expected = sum(p.numel() for p in trained.parameters())
    assert estimate(tmp_path, "fp32", seq=32).num_params == expected


def test_a_token_classification_run_folder_is_estimated_as_its_tagger(tmp_path):
    # It used to be estimated as the causal LM of the same size name, silently (no --task), or
    # refused as "the named sizes are causal LMs" (--task token-classification).
    from lowbit.models import build_token_classifier

    vocab, labels = _tagger_run(tmp_path)
    tagger = build_token_classifier("tiny", labels, vocab_size=len(vocab))
    expected = sum(p.numel() for p in tagger.parameters())
    planned = estimate(tmp_path, "fp32", seq=32, task="token-classification")
    assert planned.num_params == expected
    with pytest.raises(UsageError, match=r"task is token-classification.*--task token-class"):
        estimate(tmp_path, "fp32", seq=32)


def test_estimate_takes_a_single_recipe_with_a_trailing_comma_or_spaces(capsys):
    # `_recipes` accepted " bf16-low," (stripped), then the estimate used the raw text and failed
    # with "unknown recipe ' bf16-low,'", listing bf16-low among the valid ones.
    assert main(["estimate", "--model", "nano", "--recipe", " bf16-low,", "--seq", "32"]) == 0
    assert "recipe bf16-low;" in capsys.readouterr().out


def test_estimate_of_a_run_folder_takes_the_runs_sequence_length(tmp_path, capsys):
    """--seq defaulted to 1024 for every model: a tagger run (the tiny encoder's 64 positions)
    was refused unless --seq was given."""
    _tagger_run(tmp_path)
    argv = ["estimate", "--model", str(tmp_path), "--task", "token-classification"]
    assert main(argv) == 0
    seq_len = TASK_DEFAULTS["token-classification"]["seq_len"]
    assert f"batch 1 x seq {seq_len};" in capsys.readouterr().out
    assert main(["estimate", "--model", "nano"]) == 0
    assert "batch 1 x seq 1024;" in capsys.readouterr().out


def test_a_run_of_a_relative_model_folder_is_estimated_from_any_folder(tmp_path, monkeypatch):
    """The run recorded its relative --model folder's absolute path, but estimate read the
    relative one from the current folder ("'hf' is neither a model size ... nor a config.json")."""
    from lowbit.models import build_model

    monkeypatch.chdir(tmp_path)
    build_model("causal-lm", "nano", vocab_size=257).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    run.mkdir()
    write(TrainConfig(task="causal-lm", model="hf"), run)
    (run / "run.json").write_text(json.dumps({"model_path": str(tmp_path / "hf")}))
    expected = estimate(tmp_path / "hf", "fp32", seq=32).num_params
    monkeypatch.chdir(run)
    assert estimate(run, "fp32", seq=32).num_params == expected
