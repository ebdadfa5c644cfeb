"""Session 34 hunt: local Hugging Face folders whose tokenizer needs sentencepiece."""

import importlib.util

import pytest

from lowbit.cli import main


@pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is not None,
    reason="the refusal is of a SentencePiece tokenizer without the sentencepiece package",
)
def test_a_sentencepiece_tokenizer_without_the_package_names_the_package(tmp_path, capsys):
    """An ALBERT folder saved with its slow tokenizer holds spiece.model and no tokenizer.json;
    without sentencepiece transformers fell back to tiktoken's reader, and the error said
    "`tiktoken` is required ... fix: save the tokenizer files (tokenizer.json or vocab.txt) into
    the folder", which holds them: neither installing tiktoken nor saving files helped."""
    from transformers import AlbertConfig

    model = tmp_path / "albert"
    AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64).save_pretrained(model)  # fmt: skip
    (model / "spiece.model").write_bytes(b"\x0a\x05hello")  # sentencepiece is never reached
    data = tmp_path / "ner.txt"
    data.write_text("".join(f"w{i} O\nx B-PER\n\n" for i in range(200)), encoding="utf-8")
    args = ["train", "--task", "token-classification", "--model", str(model), "--data",
            str(data), "--steps", "1"]  # fmt: skip
    _refused_for_the_package(args, model / "spiece.model", tmp_path / "run", capsys)


@pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is not None,
    reason="the refusal is of a SentencePiece tokenizer without the sentencepiece package",
)
def test_a_causal_lm_folder_with_a_sentencepiece_tokenizer_names_the_package(tmp_path, capsys):
    """A Llama 1/2 or Mistral folder brings tokenizer.model and no tokenizer.json: without
    sentencepiece the causal-LM run said "the tokenizer is damaged (`tiktoken` is required ...);
    fix: save the model's tokenizer into its folder again", which would not help either."""
    from transformers import LlamaConfig

    model = tmp_path / "llama"
    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2).save_pretrained(model)  # fmt: skip
    (model / "tokenizer.model").write_bytes(b"\x0a\x05hello")  # sentencepiece is never reached
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x\n" * 200, encoding="utf-8")
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "1"]
    _refused_for_the_package(args, model / "tokenizer.model", tmp_path / "run", capsys)


def _refused_for_the_package(args, tokenizer_file, out, capsys) -> None:
    """`lowbit train ARGS --out OUT` fails in one line naming the sentencepiece package for
    ``tokenizer_file``, with no traceback and no run folder."""
    assert main([*args, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert (
        f"lowbit: error: {tokenizer_file}: a SentencePiece tokenizer, which needs the "
        "sentencepiece package (not installed); fix: pip install sentencepiece"
    ) in err
    assert "Traceback" not in err and not out.exists()
