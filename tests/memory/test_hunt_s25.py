"""Session-25 bug hunt: `lowbit estimate` and the memory model."""

from lowbit.cli import main


def _estimate(capsys, *args: str) -> tuple[str, str]:
    assert main(["estimate", "--model", "nano", "--seq", "16", *args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_estimate_of_fsdp_on_one_gpu_says_that_nothing_is_sharded(capsys):
    """The estimate counts FSDP over one GPU as unsharded (whole model states) but printed
    "sharding fsdp", as if its states were divided."""
    out, _ = _estimate(capsys, "--gpus", "1", "--sharding", "fsdp")
    assert "1 GPU(s), sharding none (fsdp over one GPU shards nothing)" in out
    out, _ = _estimate(capsys, "--gpus", "1", "--sharding", "fsdp", "--recipe", "fp32,bf16-mixed")
    assert "sharding none (fsdp over one GPU shards nothing)" in out
    out, _ = _estimate(capsys, "--gpus", "2", "--sharding", "fsdp")
    assert "2 GPU(s), sharding fsdp" in out


def test_estimate_warns_where_fsdp_shards_would_split_quantized_optimizer_state_blocks(capsys):
    """FSDP2 shards each parameter along dim 0; over 3 ranks the nano model's 176 x 64 MLP
    weights give shards of 59 x 64 and 58 x 64 values, not whole 256-value blocks of 8-bit
    states, which `lowbit train --nproc 3 --strategy fsdp --optimizer-state 8bit` refuses at its
    first step. The estimate printed the run's memory without a word."""
    _, err = _estimate(capsys, "--gpus", "3", "--sharding", "fsdp", "--optimizer-state", "8bit")
    assert err == (
        "lowbit: warning: fsdp over 3 GPUs splits the 256-value blocks of 8bit optimizer states "
        "across ranks, which lowbit train refuses; fix: --gpus 2 or 4, or --optimizer-state fp32 "
        "or bf16\n"
    )
    args = ("--sharding", "fsdp", "--recipe", "fp32,bf16-mixed", "--optimizer-state", "4bit")
    _, err = _estimate(capsys, "--gpus", "5", *args)
    assert err.count("warning: fsdp over 5 GPUs splits the 128-value blocks of 4bit") == 1
    for fine in (
        ("--gpus", "4", "--sharding", "fsdp", "--optimizer-state", "8bit"),
        ("--gpus", "3", "--sharding", "fsdp", "--optimizer-state", "bf16"),  # no blocks
        ("--gpus", "3", "--optimizer-state", "8bit"),  # DDP: every rank holds whole tensors
    ):
        assert _estimate(capsys, *fine)[1] == ""


def test_estimate_counts_mixed_type_layer_norm_statistics_as_the_cpu_kernel_saves_them(tmp_path):
    """ELECTRA's layer norms read bf16 inputs under bf16 autocast with fp32 weights: the CPU
    kernel saves their mean and 1/std in fp32, the fake kernel the trace ran gave them in bf16,
    so the estimate was 1 KiB (0.2%) short of the measurement here."""
    import copy
    import json

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForTokenClassification

    import lowbit
    from lowbit.memory import estimate, measure_activations
    from lowbit.models.pretrained import with_sdpa

    electra = {"model_type": "electra", "vocab_size": 100, "embedding_size": 32}
    electra.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    electra.update(intermediate_size=96, max_position_embeddings=64, num_labels=3)
    (tmp_path / "config.json").write_text(json.dumps(electra))
    config = AutoConfig.from_pretrained(tmp_path)
    torch.manual_seed(0)
    build = lambda **kw: AutoModelForTokenClassification.from_config(copy.deepcopy(config), **kw)  # noqa: E731
    model = with_sdpa(build).train()
    precision = lowbit.Precision("bf16-mixed")
    batch, seq = 2, 32
    ids = torch.randint(3, 100, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq // 2 :] = 0  # padded sentences, as the trainer's batches

    def forward():
        with precision.autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), torch.zeros_like(ids).flatten())

    saved = measure_activations(model, forward)
    # the config of the model measured, with its 3 labels (a folder's is estimated with the
    # built-in task's 11, as `lowbit train` builds its head)
    planned = estimate(config, "bf16-mixed", "fp32", batch, seq, task="token-classification")
    assert (planned.activations, planned.temporaries) == (saved.activations, saved.temporaries)
