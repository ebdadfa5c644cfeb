"""Session 30: `lowbit export` refuses a run of another task by its settings, before loading it,
and the export's end-of-text id is the one its tokenizer ends documents with."""

import torch

from lowbit.cli import main
from tests.infer.conftest import TRAIN


def test_a_token_classifier_whose_data_moved_is_refused_as_such(moved_tagger, capsys):
    """Export built the run's task before it checked the task: a token-classification run (or
    a folder quantized from it) whose CoNLL data had moved was refused with "no such CoNLL file;
    fix: check the data path", and with the data back, refused again for its task."""
    capsys.readouterr()
    for source in ("tagger", "tagger-int8"):
        assert main(["export", source, "--out", "hf"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a token-classification run; fix:" in err, err
        assert "export a causal-lm run" in err and not (moved_tagger / "hf").exists()


def _model_with_tokenizer(folder, eos_token_id):
    """A fresh Llama (a config.json, no weights) beside a character-level tokenizer whose
    end-of-text is id 3, the config's ``eos_token_id`` given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    chars = sorted(set(__import__("string").printable))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3} | {c: 4 + i for i, c in enumerate(chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="<eot>"
    ).save_pretrained(folder)
    LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        eos_token_id=eos_token_id,
    ).save_pretrained(folder)


def test_an_export_stops_generating_at_its_tokenizers_end_of_text(tmp_path, capsys):
    """A model folder's config.json naming another eos than its tokenizer's (a fresh model from a
    config, LlamaConfig's eos 2) was exported with that eos alone: the run joined its documents
    with the tokenizer's end-of-text, where `lowbit generate` stops, and transformers' generate
    ran on past it. The tokenizer's id is added; a config that names it stays as it was."""
    import json

    from transformers import AutoModelForCausalLM

    model, hf = tmp_path / "model", tmp_path / "hf"
    _model_with_tokenizer(model, 2)
    # a small text: encoding the built-in corpus with this tokenizer takes seconds
    text = tmp_path / "text.txt"
    text.write_text("".join(f"paragraph {i}: some words {i % 7} here.\n\n" for i in range(300)))
    run = ["train", "--model", str(model), "--recipe", "fp32", "--data", str(text), *TRAIN]
    assert main([*run, "--out", str(tmp_path / "run")]) == 0
    for config_eos, exported_eos in ((2, [2, 3]), (3, 3), ([2, 3], [2, 3])):
        config = json.loads((model / "config.json").read_text())  # the run's architecture
        (model / "config.json").write_text(json.dumps(config | {"eos_token_id": config_eos}))
        assert main(["export", str(tmp_path / "run"), "--out", str(hf), "--force"]) == 0
        exported = AutoModelForCausalLM.from_pretrained(hf)
        assert exported.config.eos_token_id == exported_eos
        assert exported.generation_config.eos_token_id == exported_eos
    capsys.readouterr()
    with torch.no_grad():  # a model whose every logit favours end-of-text stops after one token
        favour = torch.zeros(128).index_fill_(0, torch.tensor([3]), 1e4)
        exported.lm_head.bias = torch.nn.Parameter(favour)
        out = exported.generate(torch.tensor([[5, 6]]), max_new_tokens=5, do_sample=False)
    assert out.tolist() == [[5, 6, 3]]
