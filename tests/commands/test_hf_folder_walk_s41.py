"""A user's own Hugging Face folders, end to end (session 41 walk): what lowbit says of them."""

import json
import logging

import pytest
import torch

from lowbit.cli import main

TRAIN = ["--steps", "1", "--eval-interval", "1", "--batch-size", "2", "--seq-len", "16", "--quiet"]
WORDS = [
    "import",
    "json",
    "def",
    "return",
    "class",
    "self",
    "value",
    "None",
    "True",
    "False",
    "if",
    "else",
    "for",
    "in",
    "while",
]


@pytest.fixture
def transformers_log():
    """The messages transformers logs while the test runs (its handler writes to the stream it
    was given at start, which ``capsys`` does not capture)."""
    from transformers.utils import logging as hf_logging

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = hf_logging.get_logger("transformers"), Keep(logging.WARNING)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def _tokenizer():
    """A word-level tokenizer of `WORDS` with its special tokens, as a user saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    for i, split in enumerate(("train", "validation", "test")):
        lines = [" ".join(WORDS[(i + j) % len(WORDS) :] + WORDS[:j]) for j in range(40)]
        (tmp_path / "text" / f"{split}.txt").write_text("\n\n".join(lines) + "\n")
    return tmp_path


def _llama(folder, model_type="llama", tokenizer=True, vocab_size=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer:
        _tokenizer().save_pretrained(folder)
    if model_type != "llama":
        file = folder / "config.json"
        file.write_text(file.read_text().replace('"llama"', f'"{model_type}"'))
    return folder


def test_eval_of_a_gpt2_run_logs_no_default_token_ids(text, transformers_log):
    """A GPT-2 folder of a small vocabulary (its token ids inside it): loading its run again
    checks the folder against the run's record, which leaves the special token ids out; built with
    GPT2Config's default 50256, transformers warned at every eval of ids the user never wrote."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=263, n_embd=32, n_layer=1, n_head=2, n_positions=64,
        bos_token_id=262, eos_token_id=262,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(text / "gpt2")
    _tokenizer().save_pretrained(text / "gpt2")
    assert main(["train", "--model", "gpt2", "--data", "text", *TRAIN, "--out", "run"]) == 0
    assert main(["eval", "run", "--max-batches", "1"]) == 0
    assert not [m for m in transformers_log if "_token_id must be" in m]


def test_weights_without_a_tokenizer_are_warned_of(text, capsys):
    """A model.save_pretrained without the tokenizer: the run feeds the trained embedding byte
    ids it never saw, which it did without a word. A config-only folder (a fresh model) is not
    warned of."""
    _llama(text / "weights", tokenizer=False, vocab_size=257)
    (text / "fresh").mkdir()
    (text / "fresh" / "config.json").write_text((text / "weights" / "config.json").read_text())
    capsys.readouterr()
    assert main(["train", "--model", "fresh", "--data", "text", *TRAIN, "--out", "a"]) == 0
    assert "no tokenizer files" not in capsys.readouterr().err
    assert main(["train", "--model", "weights", "--data", "text", *TRAIN, "--out", "b"]) == 0
    err = capsys.readouterr().err
    assert "weights holds weights but no tokenizer files" in err
    assert "fix: save the model's tokenizer into the folder" in err


def test_unknown_model_type_beside_a_tokenizer_is_one_line(text, capsys, transformers_log):
    """A config.json transformers does not know, beside tokenizer files: the tokenizer's load read
    it first, and transformers logged a paragraph before lowbit's one-line refusal."""
    _llama(text / "odd", model_type="llamaz")
    assert main(["train", "--model", "odd", "--data", "text", *TRAIN, "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "unknown model_type 'llamaz'; fix:" in err
    assert not [m for m in transformers_log if "llamaz" in m]
    assert not (text / "run").exists()


def test_tagger_head_of_other_labels_loads_without_transformers_warnings(
    text, capsys, transformers_log
):
    """A BERT folder whose saved head has 3 labels, trained on data of other tags: the head is
    drawn afresh, as documented, and transformers no longer warns twice that num_labels and the
    saved id2label disagree."""
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    BertForTokenClassification(config).save_pretrained(text / "bert")
    _tokenizer().save_pretrained(text / "bert")
    (text / "conll").mkdir()
    for split in ("train", "dev", "test"):
        lines = []
        for i in range(20):
            lines += [f"{WORDS[j]} {'B-LOC' if j == 0 else 'O'}" for j in range(3 + i % 3)] + [""]
        (text / "conll" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    tagger = ["train", "--task", "token-classification", "--model", "bert", "--data", "conll"]
    assert main([*tagger, *TRAIN, "--out", "run"]) == 0
    assert not [m for m in transformers_log if "num_labels" in m]


def _bert_lm(folder):
    """A BERT causal LM saved with BERT's own tokenizer file alone, vocab.txt (older checkpoints
    come without tokenizer.json)."""
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, is_decoder=True,
    )  # fmt: skip
    torch.manual_seed(0)
    BertLMHeadModel(config).save_pretrained(folder)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + WORDS) + "\n")
    return folder


def test_a_folder_with_vocab_txt_trains_with_its_own_tokenizer(text, capsys):
    """Review R4: a folder with weights and vocab.txt was told it had "no tokenizer files" and
    was fed byte ids (here refused, its 32 rows fewer than the bytes): its tokenizer is read, and
    saved with the run."""
    _bert_lm(text / "bert")
    assert main(["train", "--model", "bert", "--data", "text", *TRAIN, "--out", "run"]) == 0
    assert "no tokenizer files" not in capsys.readouterr().err
    saved = json.loads((text / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert set(saved["model"]["vocab"]) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS}


def test_a_vocabulary_file_its_tokenizer_does_not_read_is_named_so(text, capsys):
    """A GPT-2 folder with BERT's vocab.txt: GPT-2's tokenizer reads vocab.json, not that file;
    the run says lowbit cannot read it, not that the folder has no tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(text / "gpt2")
    (text / "gpt2" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", *WORDS]) + "\n")
    assert main(["train", "--model", "gpt2", "--data", "text", *TRAIN, "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "the tokenizer holds only its special tokens (no vocabulary file that GPT2" in err
    assert not (text / "run").exists()


@pytest.mark.parametrize("stray", ["special_tokens_map.json", "added_tokens.json", "merges.txt"])
def test_a_config_folder_with_a_file_of_no_vocabulary_trains_on_bytes(text, capsys, stray):
    """Review R7: a config-only folder beside a tokenizer file that holds no vocabulary was taken
    as bringing its tokenizer and refused as "the tokenizer is damaged"; it trains on lowbit's
    byte ids, as a config-only folder does."""
    _llama(text / "weights", tokenizer=False, vocab_size=257)
    (text / "fresh").mkdir()
    (text / "fresh" / "config.json").write_text((text / "weights" / "config.json").read_text())
    (text / "fresh" / stray).write_text("{}\n" if stray.endswith(".json") else "#version: 0.2\n")
    assert main(["train", "--model", "fresh", "--data", "text", *TRAIN, "--out", "run"]) == 0
