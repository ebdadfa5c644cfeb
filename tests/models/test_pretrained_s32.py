"""Local Hugging Face folders a demanding user trains from (session 32)."""

import json

import pytest

from lowbit.cli import main


@pytest.mark.parametrize(
    ("task", "fields"),
    [
        ("causal-lm", {"model_type": "mymodel", "architectures": ["MyForCausalLM"]}),
        ("token-classification", {"model_type": "mymodel"}),
        ("causal-lm", {"architectures": ["MyForCausalLM"]}),  # no model_type: the code has it
    ],
)
def test_a_folder_whose_architecture_is_its_own_code_is_refused_as_such(
    tmp_path, capsys, task, fields
):
    """A trust_remote_code folder (an auto_map naming the folder's own Python files) was told
    "unknown model_type ...; upgrade transformers", which no version of transformers fixes."""
    folder = tmp_path / "remote model"
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_my.MyConfig", "AutoModel": "modeling_my.MyModel"}
    (folder / "config.json").write_text(json.dumps({**fields, "auto_map": auto_map}))
    (folder / "modeling_my.py").write_text("raise SystemExit('the folder code ran')\n")
    args = ["train", "--task", task, "--model", str(folder), "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upgrade transformers" not in err
    assert "defined by Python code in the folder (auto_map)" in err
    assert "trust_remote_code" in err and "fix: use a checkpoint of an architecture" in err
    assert not (tmp_path / "run").exists()


ENCODER = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize(
    ("fields", "weights"),
    [
        ({"model_type": "bert", "intermediate_size": 32, **ENCODER}, False),
        ({"model_type": "roberta", "intermediate_size": 32, **ENCODER}, False),
        (
            {"model_type": "xlm", "vocab_size": 64, "emb_dim": 16, "n_layers": 1, "n_heads": 2},
            False,
        ),
        ({"model_type": "bert", "intermediate_size": 32, **ENCODER}, True),
    ],
)
def test_an_encoder_trained_as_a_causal_lm_does_not_see_the_tokens_it_predicts(
    tmp_path, fields, weights
):
    """An encoder's causal-LM class (BertLMHeadModel, RobertaForCausalLM, XLM's LM head) attends
    both ways unless its config says is_decoder (XLM: causal): each position saw the next token,
    and a run's loss fell without the model learning to predict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models import load_causal_lm

    if weights:  # a checkpoint saved as transformers writes it, without is_decoder
        config = AutoConfig.for_model(**fields)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    else:
        (tmp_path / "config.json").write_text(json.dumps(fields))
    model = load_causal_lm(tmp_path).eval()
    ids = torch.arange(4, 20).unsqueeze(0)
    changed = ids.clone()
    changed[0, 10] += 1  # a later token: no earlier position may see it
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[0, :10], after[0, :10])
