"""Session 30's hunt: `lowbit train --task causal-lm` with a tokenizer and data a user brings."""

import pytest

from lowbit.cli import main
from tests.data.test_data_hunt_s28 import TINY, gpt2_folder, write_text


def gpt2_with_pad(folder, text):
    """A GPT-2 folder whose tokenizer got a pad token after the model was made, saved without
    resizing the embedding (``tokenizer.add_special_tokens({"pad_token": ...})``): the tokenizer
    has one id more than the embedding has rows."""
    from transformers import AutoTokenizer

    model = gpt2_folder(folder, text)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(model)
    return model, len(tokenizer)


def test_a_tokenizer_with_an_added_token_the_embedding_lacks_trains_with_a_warning(
    tmp_path, capsys
):
    """The run was refused ("vocabulary of 300 ids is smaller than the hf tokenizer's 301"),
    with a fix (save the model's tokenizer into its folder) that the folder already followed,
    though the added pad token appears in no text: its text trains on ids the embedding has."""
    data = write_text(tmp_path / "book.txt")
    model, size = gpt2_with_pad(tmp_path / "gpt2", data.read_text())
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(data), *TINY, "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    embedding = f"the model's embedding {size - 1}: id {size - 1} ('<pad>') has no row"
    assert f"the tokenizer has {size} ids, {embedding}" in err
    assert (out / "checkpoints").is_dir()
    assert main(["eval", str(out)]) == 0  # the saved tokenizer, the same check
    # a prompt spelling the added token stopped `lowbit generate` on an IndexError traceback
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the <pad> fox", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"the text holds the token '<pad>' (id {size - 1})" in err and "Traceback" not in err


def test_a_text_holding_a_token_the_embedding_lacks_is_refused_in_one_line(tmp_path, capsys):
    """A text that spells the added token gets its id, beyond the embedding: an index error deep
    in the model's forward. It is named, with its split, before anything is written."""
    data = write_text(tmp_path / "book.txt")
    model, size = gpt2_with_pad(tmp_path / "gpt2", data.read_text())
    data.write_text(data.read_text().replace("lazy", "<pad>"))
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(data), *TINY, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"holds the token '<pad>' (id {size - 1}), which the model's embedding of" in err
    assert "Traceback" not in err and not out.exists()


def test_an_end_of_text_token_the_embedding_lacks_is_refused(tmp_path, capsys):
    """Documents are joined by the end-of-text id: one the embedding lacks cannot train."""
    from transformers import AutoTokenizer

    eos = "<|eos|>"
    data = write_text(tmp_path / "book.txt")
    model = gpt2_folder(tmp_path / "gpt2", data.read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"eos_token": eos})
    tokenizer.save_pretrained(model)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(data), *TINY, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer's end-of-text token '{eos}' (id {len(tokenizer) - 1}) has no row" in err
    assert "resize_token_embeddings" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_saved_bpe_folder_holding_another_tokenizer_is_named_as_damaged(tmp_path):
    """A run's tokenizer folder whose tokenizer.json was replaced by one without lowbit's
    end-of-text token (another model's) loaded, and joining documents stopped on a TypeError."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lowbit.data import build_tokenizer, load_tokenizer
    from lowbit.errors import UsageError

    build_tokenizer("bpe", ["def f(x):\n    return x + 1\n"] * 50, 300).save(tmp_path)
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["</s>"], show_progress=False)
    other.train_from_iterator(["some other text"] * 10, trainer)
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        UsageError, match=r"damaged \(tokenizer\.json has no <\|endoftext\|> token\)"
    ):
        load_tokenizer(tmp_path)
