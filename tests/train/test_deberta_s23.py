"""DeBERTa encoders and autocast: transformers' DeBERTa (v1) attention cannot run under autocast
(huggingface/transformers#35332), so a recipe that autocasts is refused in one line before the run
starts; the recipes without autocast train it, and DeBERTa-v2 trains under autocast as well."""

import math

import pytest
import torch

from lowbit.cli import main
from lowbit.train import train

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "self", "(", ")", ":", "="]


def _deberta_folder(folder, version: str):
    """A tiny 'pretrained' DeBERTa (v1 or v2) with a word-piece tokenizer, as save_pretrained
    writes it; relative attention on, as the published checkpoints have it."""
    import transformers
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    config_class, model_class = {
        "v1": (transformers.DebertaConfig, transformers.DebertaModel),
        "v2": (transformers.DebertaV2Config, transformers.DebertaV2Model),
    }[version]
    config = config_class(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, relative_attention=True,
        pos_att_type=["c2p", "p2c"],
    )  # fmt: skip
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    return str(folder)


def _conll_folder(folder):
    """Train, dev and test splits of 16 short tagged sentences (the built-in task is ~8000
    sentences, seconds to tokenize)."""
    folder.mkdir()
    words = WORDS[5:]
    sentence = "\n".join(f"{w} {'B-KW' if w in ('def', 'return') else 'O'}" for w in words)
    for split in ("train", "dev", "test"):
        (folder / f"{split}.txt").write_text((sentence + "\n\n") * 16)
    return str(folder)


def test_deberta_v1_under_autocast_is_refused_in_one_line_before_the_run(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model = _deberta_folder(tmp_path / "deberta", "v1")
    data = _conll_folder(tmp_path / "conll")
    argv = ["train", "--task", "token-classification", "--model", model, "--data", data]
    assert main([*argv, "--recipe", "bf16-mixed", "--steps", "1", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "recipe bf16-mixed runs under bfloat16 autocast" in err
    assert "fix: a recipe without autocast" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("version", "recipe"),
    [("v1", "fp32"), ("v1", "bf16-low"), ("v2", "bf16-mixed"), ("v2", "fp8-tensorwise")],
)
def test_deberta_trains_where_its_attention_can(tiny_config, tmp_path, version, recipe):
    """v1 in recipes without autocast, v2 under autocast too: none of these is refused."""
    model = _deberta_folder(tmp_path / "deberta", version)
    data = _conll_folder(tmp_path / "conll")
    config = tiny_config(
        "token-classification", model=model, data=data, recipe=recipe, steps=2, batch_size=8
    )
    result = train(config, quiet=True)
    assert result.status == "completed"
    assert math.isfinite(result.final_metrics["loss"])


def test_deberta_v1_is_refused_by_precision_in_a_users_own_loop():
    import transformers

    import lowbit
    from lowbit.errors import UsageError

    config = transformers.DebertaConfig(
        vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.DebertaForTokenClassification(config)
    with pytest.raises(UsageError, match="DeBERTa \\(v1\\) attention overflows 16 bits"):
        lowbit.Precision("bf16-mixed").convert(model)
    assert lowbit.Precision("fp32").convert(model) is model  # no autocast: trains
