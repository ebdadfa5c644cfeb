"""Session 32's hunt in `lowbit generate`: its errors name the options typed, and a Hugging Face
tokenizer's decoding keeps the text the model sampled."""

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import sample_text


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("--max-new-tokens", "-1", "--max-new-tokens -1 is negative"),
        ("--temperature", "-1", "--temperature -1.0 is not a finite value >= 0"),
        ("--top-k", "-1", "--top-k -1 is negative"),
        ("--top-p", "0", "--top-p 0.0 is not in (0, 1]"),
        ("--seed", "-1", "--seed must be in [0, 2**32), got -1; fix: e.g. --seed 0"),
    ],
)
def test_generate_sampling_errors_name_the_option_typed(tmp_path, capsys, flag, value, named):
    """The CLI user typed ``--top-k``; the message named the Python parameter ``top_k``. The
    settings are checked before the run is read, so no run is needed."""
    assert main(["generate", str(tmp_path / "run"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert named in err, err


def test_sample_text_errors_name_its_parameters():
    """Called from Python, the message names the keyword argument (``top_k=``), not a flag."""
    with pytest.raises(UsageError, match=r"^top_k -1 is negative"):
        sample_text(None, None, None, "x", top_k=-1)
    with pytest.raises(UsageError, match=r"fix: e\.g\. seed=0$"):
        sample_text(None, None, None, "x", seed=-1)


def test_a_hugging_face_tokenizers_space_clean_up_does_not_alter_the_sample():
    """transformers' clean-up joins " ." to the word before it ("hello ." -> "hello."): the
    sample printed other text than the tokens the model chose, and decode(encode(x)) != x."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import lowbit
    from lowbit.train.tasks import HFTokenizer

    vocab = {"▁.": 0, "▁hello": 1, "</s>": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    # many Hub models' tokenizer_config.json ask for the clean-up
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", clean_up_tokenization_spaces=True
    )
    tokenizer = HFTokenizer(fast)
    assert tokenizer.decode(tokenizer.encode("hello . .")) == "hello . ."
    shape = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(**shape, intermediate_size=16, vocab_size=4))
    torch.nn.init.zeros_(model.model.norm.weight)  # every logit 0: greedy picks id 0, "▁."
    text = sample_text(model, tokenizer, lowbit.Precision("fp32"), "hello", 2, temperature=0)
    assert text == "hello . ."


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_utf16_prompt_file_is_refused_with_the_conversion_that_reads_it(
    tmp_path, capsys, encoding, named
):
    """Windows Notepad's "Unicode" and Windows PowerShell's ``>`` write UTF-16 with a byte-order
    mark: the error's fix for a Latin-1 file, ``iconv -f latin1``, turned it into a prompt of NUL
    bytes between its letters. The prompt is read before the run is, so no run is needed."""
    path = tmp_path / "prompt.txt"
    path.write_text("def hello():", encoding=encoding)  # Python writes the byte-order mark
    assert main(["generate", str(tmp_path / "run"), "--prompt-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert f"{named}LE text, not UTF-8" in err, err
    assert f"iconv -f {named} -t UTF-8" in err and "latin1" not in err, err
