"""Session 31: what `lowbit export` writes loads in transformers as a whole, the tokenizer too."""

import pytest

from lowbit.cli import main
from lowbit.data import load_tokenizer

TRAIN = ["--steps", "1", "--eval-interval", "1", "--batch-size", "2", "--seq-len", "16", "--quiet"]
TEXT = "def f(x):\n    return 'é ✓' + x  # <not special>"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_an_exported_tokenizer_loads_with_autotokenizer_and_gives_the_runs_ids(
    kind, tmp_path, capsys, monkeypatch
):
    """The export copied lowbit_tokenizer.json (and BPE's tokenizer.json) only:
    `AutoTokenizer.from_pretrained(export)` failed for the byte tokenizer ("Couldn't instantiate
    the backend tokenizer"), though the docs promise a folder transformers loads."""
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    # a small text: the built-in corpus takes seconds to learn BPE from and to encode
    code = "".join(
        f"def f{i}(x):\n    return x * {i} + {i % 7}  # note {i}\n\n" for i in range(300)
    )
    (tmp_path / "text.txt").write_text(code, encoding="utf-8")
    extra = ["--tokenizer", "bpe", "--vocab-size", "300"] if kind == "bpe" else []
    assert main(["train", *TRAIN, *extra, "--data", "text.txt", "--out", "run"]) == 0
    assert main(["export", "run", "--out", "hf"]) == 0
    assert "tokenizer_config.json" in capsys.readouterr().out
    ours = load_tokenizer(tmp_path / "run" / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs(TEXT)["input_ids"] == ours.encode(TEXT)
    assert theirs.decode(ours.encode(TEXT)) == TEXT
    assert theirs.eos_token_id == ours.eot_id == AutoConfig.from_pretrained("hf").eos_token_id
    # lowbit's own reader of the export (`lowbit train --model hf`) still finds its tokenizer
    assert load_tokenizer(tmp_path / "hf").encode(TEXT) == ours.encode(TEXT)
