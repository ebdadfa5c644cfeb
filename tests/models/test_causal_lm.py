import pytest
import torch

from lowbit.errors import UsageError
from lowbit.models import build_model
from lowbit.models.causal_lm import (
    SIZES,
    build_causal_lm,
    list_sizes,
    load_causal_lm,
    model_config,
)


def param_count_on_meta(size, vocab_size=None):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config(size, vocab_size))
    return sum(p.numel() for p in model.parameters())


def test_tiny_is_about_a_million_parameters_and_untied():
    model = build_causal_lm("tiny", vocab_size=257)
    count = sum(p.numel() for p in model.parameters())
    assert 0.7e6 < count < 1.3e6
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("size", "low", "high"),
    [("nano", 0.1e6, 0.2e6), ("small", 8e6, 13e6), ("medium", 32e6, 48e6), ("gpt2-124m", 120e6, 128e6),
     ("llama-1b", 1.2e9, 1.3e9), ("llama-7b", 6.6e9, 6.9e9), ("llama-13b", 12.8e9, 13.2e9),
     ("llama-70b", 68e9, 70e9)],
)  # fmt: skip
def test_named_shapes_have_their_published_sizes(size, low, high):
    vocab = 257 if size in ("nano", "small", "medium") else None
    assert low < param_count_on_meta(size, vocab) < high


def test_sizes_listed_smallest_first():
    sizes = list_sizes()
    assert sizes == list(SIZES) and sizes[0] == "nano"
    counts = [param_count_on_meta(s) for s in sizes]
    assert counts == sorted(counts)


def test_forward_shapes_and_seeded_init():
    model = build_causal_lm("tiny", vocab_size=300, seed=1)
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 300)
    assert torch.isfinite(out.loss)
    same = build_causal_lm("tiny", vocab_size=300, seed=1)
    other = build_causal_lm("tiny", vocab_size=300, seed=2)
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight, same.get_input_embeddings().weight)
    assert not torch.equal(weight, other.get_input_embeddings().weight)


def test_building_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_causal_lm("tiny", 257, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_sequence_longer_than_positions_is_a_usage_error():
    build_causal_lm("tiny", 257, max_seq_len=1024)
    with pytest.raises(UsageError, match="sequence length 1025 exceeds the model's 1024"):
        build_causal_lm("tiny", 257, max_seq_len=1025)


def test_unknown_size_lists_valid_ones():
    with pytest.raises(UsageError, match="valid model sizes: nano, tiny, small"):
        model_config("huge")


def test_load_saved_checkpoint_round_trip(tmp_path):
    model = build_causal_lm("tiny", 257, seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path)
    ids = torch.randint(0, 257, (1, 8))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
    assert isinstance(build_model("causal-lm", str(tmp_path), vocab_size=257, seed=0),
                      type(model))  # fmt: skip
    with pytest.raises(UsageError, match="exceeds"):
        load_causal_lm(tmp_path, max_seq_len=4096)


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match=r"no config\.json"):
        load_causal_lm(tmp_path / "missing")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=50)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(
        UsageError, match=r"'bert' checkpoint \(BertModel\) is not a causal language model"
    ):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"model_type": "llama", ', r"not valid JSON \(Expecting .*line 1 column 25"),
        ('{"hidden_size": 32}', r'no "model_type" field; fix: add'),
        ('{"model_type": "lama"}', r"unknown model_type 'lama'; fix: correct it"),
        ('["llama"]', r"not a JSON object; fix:"),
        (
            '{"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}',
            r"transformers cannot read this config \(.*hidden size \(30\) is not a multiple",
        ),
    ],
)
def test_a_bad_config_is_a_one_line_usage_error(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(UsageError, match=rf"^{tmp_path}/config\.json: {message}") as error:
        load_causal_lm(tmp_path)
    assert "\n" not in str(error.value)


def test_train_on_a_bad_model_folder_exits_2_with_one_line(tmp_path, capsys):
    from lowbit.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama", ')
    (tmp_path / "data.txt").write_text("some text\n\nmore text\n")
    args = ["train", "--model", tmp_path / "model", "--data", tmp_path / "data.txt", "--steps", "1"]
    assert main([str(a) for a in [*args, "--out", tmp_path / "run", "--quiet"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and "not valid JSON" in err and err.count("\n") == 1


def test_a_config_only_folder_or_file_gives_a_seeded_fresh_model(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=257).save_pretrained(tmp_path)
    state = torch.get_rng_state()
    first = build_model("causal-lm", str(tmp_path), vocab_size=257, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    again = load_causal_lm(tmp_path, seed=1)
    other = load_causal_lm(tmp_path, seed=2)
    from_file = load_causal_lm(tmp_path / "config.json", seed=1)  # the file itself does too
    assert torch.equal(first.lm_head.weight, from_file.lm_head.weight)
    assert type(first).__name__ == "GPT2LMHeadModel" and first.config.n_layer == 2
    weight = first.transformer.h[0].attn.c_attn.weight
    assert torch.equal(weight, again.transformer.h[0].attn.c_attn.weight)
    assert not torch.equal(weight, other.transformer.h[0].attn.c_attn.weight)


def test_training_from_a_config_only_folder(tmp_path):
    from transformers import LlamaConfig

    from lowbit.cli import main

    model = tmp_path / "pico"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=257).save_pretrained(model)  # fmt: skip
    run = tmp_path / "run"
    args = ["train", "--model", str(model), "--recipe", "fp32", "--steps", "2", "--seq-len", "16"]
    args += ["--batch-size", "2", "--eval-batches", "1", "--out", str(run), "--quiet"]
    assert main(args) == 0
    assert (run / "checkpoints").is_dir()
