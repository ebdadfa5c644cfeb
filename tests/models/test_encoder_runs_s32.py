"""Session 32: lowbit builds an encoder folder's causal LM (BERT, RoBERTa, XLM) as a decoder; a
run records that it was built so, and a run trained from such a folder before (its weights
learned to attend both ways) is refused by every command that loads it, rather than evaluated,
resumed or exported as a causal model it never was."""

import json

import pytest

from lowbit.cli import main
from lowbit.models.pretrained import model_record
from tests.llama import save_llama
from tests.train.test_model_folder_s30 import refusal

TINY = ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--quiet"]
REFUSED = "with attention in both directions (before lowbit built such models as decoders)"


def save_bert(folder) -> None:
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.architectures = ["BertLMHeadModel"]
    config.save_pretrained(folder)


@pytest.fixture
def bert_run(tmp_path):
    """A 2-step causal-lm run trained from a tiny BERT folder: (model folder, run folder)."""
    model, run = tmp_path / "bert", tmp_path / "run"
    save_bert(model)
    assert main(["train", "--model", str(model), *TINY, "--steps", "2", "--out", str(run)]) == 0
    return model, run


def test_a_run_from_an_encoder_folder_records_it_was_built_as_a_decoder(bert_run, capsys):
    _, run = bert_run
    info = json.loads((run / "run.json").read_text())
    assert info["model_record"]["as_decoder"] == ["is_decoder"]
    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert (run / "checkpoints" / "step-0000003.pt").is_file()


def test_a_run_from_an_encoder_folder_trained_both_ways_is_refused(bert_run, capsys):
    """Trained before lowbit built an encoder as a decoder, such a run's config.json is unchanged,
    so resume, eval, generate and export loaded its weights (trained with attention in both
    directions) into the causal model without a word, and export wrote is_decoder: true."""
    model, run = bert_run
    info = json.loads((run / "run.json").read_text())
    del info["model_record"]["as_decoder"]  # as a run trained before recorded it
    (run / "run.json").write_text(json.dumps(info))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    commands = [
        ["train", "--resume", str(run), "--steps", "3", "--quiet"],
        ["eval", str(run), "--max-batches", "1"],
        ["generate", str(run), "--max-new-tokens", "2"],
        ["export", str(run), "--out", str(run.parent / "hf")],
    ]
    for argv in commands:
        error = refusal(argv, capsys)
        assert f"{run} was trained from encoder {model} {REFUSED}" in error, error
        assert "fix: train a new run from the folder" in error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert not (run.parent / "hf").exists()
    assert json.loads((run / "run.json").read_text()) == info


def test_decoder_and_token_classification_records_are_unchanged(tmp_path):
    """Only an encoder's causal LM is built as a decoder: a Llama folder, or a BERT folder
    trained as a token classifier, records no as_decoder (and is not refused without one)."""
    save_llama(tmp_path / "llama")
    save_bert(tmp_path / "bert")
    assert "as_decoder" not in model_record(tmp_path / "llama")
    assert "as_decoder" not in model_record(tmp_path / "bert", "token-classification")
    assert model_record(tmp_path / "bert")["as_decoder"] == ["is_decoder"]


def test_estimate_builds_an_encoder_folder_as_a_decoder(tmp_path):
    """The memory estimate (`lowbit estimate`, and `lowbit train`'s before each run) built the
    encoder's causal LM without is_decoder: another model than the one trained, and transformers
    told the user to "add `is_decoder=True`", which lowbit does."""
    import torch

    from lowbit.memory.estimate import build_planned_model, load_model_config

    save_bert(tmp_path / "bert")
    config, name = load_model_config(str(tmp_path / "bert"))
    model = build_planned_model(config, name, torch.float32, "causal-lm")
    assert model.config.is_decoder
    assert not config.is_decoder  # the config given is left as it was
