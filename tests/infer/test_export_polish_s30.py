"""Session 30: `lowbit export --dtype fp16` refuses weights past fp16's range, quantize/prune/export
keep transformers' progress bars off, and a quantized Gemma 3 head is untied in both configs."""

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.infer import load_source

TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--quiet"]
BARS = ("Loading weights", "Writing model shards")  # transformers' tqdm bars


@pytest.fixture(scope="module")
def gemma3_run(tmp_path_factory):
    """A tiny multimodal Gemma 3 (head tied to the embedding, as published) trained one step."""
    import transformers

    folder = tmp_path_factory.mktemp("gemma3")
    text = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "head_dim": 8}
    text |= {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
    text |= {"sliding_window": 16, "max_position_embeddings": 64}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision)
    config.mm_tokens_per_image = 4
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(folder / "model")
    args = ["train", "--model", str(folder / "model"), *TRAIN, "--out", str(folder / "run")]
    assert main(args) == 0
    return folder / "run"


def test_fp16_export_refuses_weights_beyond_fp16s_range(tmp_path, capsys):
    """fp16's largest value is 65504: a weight of 1e5 was written as inf without a word (and the
    exported model's logits were inf/NaN). Refused in one line naming the tensor, its largest
    |value| and the dtypes that hold it, before --out is made; bf16 exports it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.intermediate_size, config.vocab_size, config.max_position_embeddings = 64, 300, 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[
            299, 0
        ] = -1e5  # a token the byte tokenizer never gives (decays to 99998.5)
    model.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    args = ["train", "--model", str(tmp_path / "model"), "--recipe", "fp32", *TRAIN]
    assert main([*args, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.embed_tokens.weight holds |w| up to 999" in err, err
    assert "beyond fp16's largest 65504" in err and "fix: use --dtype bf16" in err, err
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_quantize_prune_and_export_print_no_transformers_progress_bars(
    gemma3_run, tmp_path, capsys
):
    """Loading a --model folder's run (from_pretrained) and writing the export (save_pretrained)
    drew transformers' "Loading weights" and "Writing model shards" bars on stderr between
    lowbit's own lines; training already turns them off. They are on again afterwards."""
    from transformers.utils import logging as hf_logging

    capsys.readouterr()
    commands = (
        ["quantize", str(gemma3_run), "--to", "int8", "--out", str(tmp_path / "q")],
        ["prune", str(gemma3_run), "--pattern", "2:4", "--out", str(tmp_path / "p")],
        ["export", str(tmp_path / "q"), "--out", str(tmp_path / "hf")],
    )
    for command in commands:
        assert main(command) == 0
        err = capsys.readouterr().err
        assert not any(bar in err for bar in BARS), (command[0], err)
    assert hf_logging.is_progress_bar_enabled()


def test_a_quantized_gemma3_head_is_untied_in_its_text_config_too(gemma3_run, tmp_path):
    """Gemma 3's config says ``tie_word_embeddings`` at the top and in ``text_config``; an export
    of its int8 head set only the top one false, leaving the text config asking a loader to tie
    the head to the (unquantized) embedding. Both say false, and the logits are lowbit's."""
    from transformers import AutoModelForCausalLM

    quant, hf = tmp_path / "q", tmp_path / "hf"
    assert main(["quantize", str(gemma3_run), "--to", "int8", "--out", str(quant)]) == 0
    assert main(["export", str(quant), "--out", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["text_config"]["tie_word_embeddings"] is False
    exported = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_source(quant).model(input_ids=ids, use_cache=False).logits
        theirs = exported(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
