"""Follow-ups of session 25's bug hunt in the trainer: the run's train loss over steps that fp16
loss scaling skipped, step 2's statistics beside the memory report's extra forward, FSDP over rank
counts that split quantized optimizer states, a CoNLL pipe, and a config-only --model folder with
another head."""

import json
import math
import os

import pytest

from lowbit.cli import main
from lowbit.distributed.context import SingleProcess
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module

TINY_IMAGES = {"task": "image-classification", "batch_size": 8, "eval_batches": 1}


def _records(run, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == split]


def test_the_train_loss_leaves_out_steps_that_loss_scaling_skipped(tmp_path, monkeypatch):
    """A step whose fp16 loss overflows is skipped and the run goes on finite; counted in the mean
    of the last steps, it made the run's train loss (and compare's train gap) NaN, "n/a"."""
    original_init = trainer_module.Trainer.__init__

    def init(self, *args, **kw):
        original_init(self, *args, **kw)
        loss = self.task.loss

        def overflowing_at_step_3(model, batch):
            value, count = loss(model, batch)
            return (value * math.inf if self.step_idx == 2 else value), count

        self.task.loss = overflowing_at_step_3

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    config = TrainConfig(**TINY_IMAGES, steps=4, recipe="fp16-mixed", out=str(tmp_path / "run"))
    result = train(config, quiet=True)
    assert result.skipped_steps == 1
    losses = [record["loss"] for record in _records(tmp_path / "run", "train")]
    assert losses[2] == "inf"  # the skipped step, as metrics.jsonl writes it
    finite = [losses[0], losses[1], losses[3]]
    assert result.train_loss == sum(finite) / len(finite)


def test_step_2s_statistics_are_the_steps_own_not_the_memory_reports(tmp_path):
    """At step 2 a one-process run measures its memory with one extra forward of the first
    micro-batch; observed, it replaced the forward operands' statistics of the step (those of its
    last micro-batch) by the first micro-batch's. Row-wise fp8 quantizes the backward's copy of x
    on its own, so its statistics say which micro-batch the forward's are of."""
    config = TrainConfig(
        **TINY_IMAGES,
        steps=2,
        grad_accum=2,
        stats_interval=1,
        recipe="fp8-rowwise",
        out=str(tmp_path / "run"),
    )
    train(config, quiet=True)
    stats = _records(tmp_path / "run", "stats")
    assert [record["step"] for record in stats] == [1, 2]
    for record in stats:
        forward = {k: v for k, v in record.items() if k.endswith("/forward.x/amax")}
        assert forward
        for key, amax in forward.items():
            assert amax == record[key.replace("/forward.x/", "/grad_weight.x/")], key


class _FsdpRanks(SingleProcess):
    """Rank 0 of an FSDP run over ``world_size`` processes, as far as building its Trainer goes
    (the check comes before the model is sharded)."""

    strategy = "fsdp"

    def __init__(self, world_size: int):
        self.world_size = world_size


def test_fsdp_over_a_rank_count_that_splits_quantized_state_blocks_names_the_counts_that_work(
    tmp_path, monkeypatch
):
    """Over 3 ranks some parameter of the nano model shards into rows that are not whole 256-value
    blocks of 8-bit Adam states: the first step failed with "fix: shard along a dimension whose
    slices hold whole blocks", which a `lowbit train --nproc 3` user cannot act on."""
    config = TrainConfig(
        model="nano", seq_len=32, batch_size=12, optimizer_state="8bit", out=str(tmp_path / "r")
    )
    with pytest.raises(UsageError) as refused:
        trainer_module.Trainer(config, dist=_FsdpRanks(3), quiet=True)
    message = str(refused.value)
    assert message.startswith("fsdp over 3 processes splits the 256-value blocks of 8bit")
    assert message.endswith("fix: --nproc 2 or 4, or --optimizer-state fp32 or bf16")
    trainer_module.Trainer(config, dist=_FsdpRanks(2), quiet=True)  # whole blocks: no refusal
    with monkeypatch.context() as torchrun:  # a rank torchrun started: its flag, not --nproc
        torchrun.setenv("TORCHELASTIC_RUN_ID", "job")
        torchrun.setenv("WORLD_SIZE", "3")
        torchrun.setenv("LOCAL_WORLD_SIZE", "3")
        with pytest.raises(UsageError, match="fix: torchrun --nproc-per-node 2 or 4, or"):
            trainer_module.Trainer(config, dist=_FsdpRanks(3), quiet=True)
    fp32_states = TrainConfig(**{**config.to_dict(), "optimizer_state": "fp32"})
    trainer_module.Trainer(fp32_states, dist=_FsdpRanks(3), quiet=True)


def test_a_conll_pipe_is_refused_as_a_pipe_not_as_a_missing_path(tmp_path, capsys):
    """`--data <(zcat x.conll.gz)` names a pipe that exists: "no such CoNLL file or folder" sent
    the user looking for a typo."""
    pipe = tmp_path / "train.conll"
    os.mkfifo(pipe)
    argv = ["train", "--task", "token-classification", "--data", str(pipe), "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{pipe}: not a regular file or folder but a pipe or device" in err
    assert "fix: save the CoNLL text to a file" in err
    assert not (tmp_path / "run").exists()


def test_a_config_only_model_folder_with_another_head_names_the_head_and_the_fix(tmp_path, capsys):
    """A Llama config whose architectures name a sequence classifier was refused with "a 'llama'
    checkpoint ... is not a causal language model; fix: use a decoder checkpoint such as Llama"."""
    folder = tmp_path / "classifier"
    folder.mkdir()
    fields = {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 300,
    }
    (folder / "config.json").write_text(json.dumps(fields))
    assert (
        main(["train", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (
        "(LlamaForSequenceClassification) is not a causal language model: its config names a sequence-classification head"
        in err
    )
    assert 'fix: set "architectures": ["LlamaForCausalLM"] in the config.json' in err
    assert "such as Llama" not in err
    fields["architectures"] = ["LlamaForCausalLM"]  # the fix, followed
    (folder / "config.json").write_text(json.dumps(fields))
    args = ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--quiet"]
    assert (
        main(["train", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "r"), *args])
        == 0
    )


def test_a_resumed_runs_event_file_is_read_after_the_crashed_runs(tmp_path):
    """TensorBoard reads event files in name order (``<second>.<host>.<pid>.<counter>``, as
    text) and purges the resumed steps only from files read before: a resume opened in the
    second of the crashed run's writer could sort first, and the crashed run's step 3 stayed in
    the curves beside the resumed run's (test_user_runs' TensorBoard test failed now and then)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowbit.train.logging import MetricsLogger

    crashed = MetricsLogger(tmp_path, {})
    for step in (1, 2, 3):
        crashed.log(step, "train", {"loss": float(step)})
    crashed.close()
    (written,) = (tmp_path / "tensorboard").iterdir()
    # a name that sorts after any this process writes within the next second
    name = f"events.out.tfevents.{int(time.time()) + 1:010d}.~host.99999.9"
    written.rename(written.with_name(name))
    resumed = MetricsLogger(tmp_path, {}, resume_step=2)
    resumed.log(3, "train", {"loss": 30.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert shown == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_an_auto_run_resumes_under_another_spelling_of_its_recipe(tmp_path, capsys):
    """auto:fp8 is auto (its default budget), but --resume compared the names as spelled and
    refused "cannot resume with recipe 'auto:fp8': the run was trained with 'auto'"; another
    budget is another recipe and still refused."""
    run = tmp_path / "run"
    tiny = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
    assert (
        main(["train", *tiny, "--recipe", "auto", "--steps", "2", "--out", str(run), "--quiet"])
        == 0
    )
    capsys.readouterr()
    resumed = ["train", "--resume", str(run), "--steps", "3", "--quiet"]
    assert main([*resumed, "--recipe", "auto:fp4"]) == 2
    assert "cannot resume with recipe 'auto:fp4'" in capsys.readouterr().err
    assert main([*resumed, "--recipe", "auto:fp8"]) == 0
