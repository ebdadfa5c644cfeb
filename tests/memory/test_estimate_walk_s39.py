"""Session 39: the estimate against the bytes a real training step holds, beyond the default model.

A converted mixture-of-experts layer (`lowbit.nn.experts`) keeps each expert GEMM's input as it
came (fp32 hidden states under autocast) and gives its output in autocast's dtype; the trace
counted the input in bf16 and left transformers' grouped GEMM output in fp32, so the small
Mixtral of `tests.moe.mixtral_config()`, saved with ``save_pretrained``, read 23% over the measured
`fp8-rowwise` activations (3,190,820 against 2,600,996 bytes at `lowbit train --batch-size 4
--seq-len 64`: docs/memory.md has the commands)."""

import json
import re

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.memory.breakdown import COMPONENTS
from lowbit.memory.estimate import estimate
from tests.memory.test_estimate_exact_s31 import BATCH, SEQ, _measured  # the step it measures
from tests.moe import mixtral, mixtral_config


@pytest.mark.parametrize("recipe", ["fp8-rowwise", "int8"])
def test_converted_experts_are_estimated_as_a_step_holds_them(recipe):
    # fp8-rowwise keeps the input as it came; int8 a bf16 cast of it for each expert
    live = _measured(mixtral(), recipe, "fp32")
    planned = estimate(mixtral_config(), recipe, "fp32", BATCH, SEQ)
    for name in COMPONENTS:
        assert getattr(planned, name) == getattr(live, name), name


def test_ddp_ranks_hold_each_gradient_once():
    """`lowbit train --nproc N` wraps the model in DistributedDataParallel, whose all-reduce
    buckets held a copy of every gradient beside ``.grad`` until session 39 (4 of bf16-mixed's 20
    bytes per parameter per rank, which the estimate then counted); each ``.grad`` is now a view
    of its bucket (`lowbit.distributed.ddp`): the gradients live in the buckets' storages alone.
    The estimate, of the peak, counts a second copy while DDP rebuilds its buckets once, before
    the second step's forward, holding the old and the new ones for a moment (a 1-rank DDP run of
    `medium` rose by one gradient copy, 138 MiB, over its second step)."""
    import torch.distributed as dist

    from lowbit.distributed.context import free_port
    from lowbit.distributed.ddp import wrap_ddp
    from lowbit.memory.measure import tensor_bytes
    from lowbit.models import build_causal_lm

    whole = estimate("nano", "bf16-low", "fp32", BATCH, SEQ)
    precision = lowbit.Precision("bf16-low")
    model = precision.convert(build_causal_lm("nano", 257))
    address = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=1)
    try:
        ddp, _ = wrap_ddp(model, precision, torch.device("cpu"))
        sizes = ddp._get_ddp_logging_data()["bucket_sizes"]  # bytes, ", "-separated
        tokens = torch.randint(0, 257, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        with precision.autocast():
            loss = ddp(tokens).logits.float().mean()
        precision.backward(loss)
    finally:
        dist.destroy_process_group()
    buckets = sorted(int(size) for size in sizes.split(","))
    grads = [p.grad for p in model.parameters()]
    storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
    assert sorted(storages.values()) == buckets  # every gradient in a bucket, no copy beside
    assert tensor_bytes(grads) == sum(buckets) == whole.gradients
    for gpus, sharding in ((1, "ddp"), (2, "ddp"), (2, "none")):  # train's --nproc 2: DDP
        rank = estimate("nano", "bf16-low", "fp32", BATCH, SEQ, gpus=gpus, sharding=sharding)
        # and the peak's second copy, while DDP rebuilds its buckets before the second step's
        # forward (session 40: beside no activations; tests/memory/test_ddp_peak_s40.py)
        assert rank.gradients == rank.bucket_rebuild == whole.gradients
        assert any("rebuilds its all-reduce buckets" in note for note in rank.notes)


def _estimate_json(capsys, *argv) -> dict:
    assert main(["estimate", "--model", "nano", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_takes_train_batch_size_and_seq_len(capsys):
    """A user pasting `lowbit train`'s flags was refused ("unrecognized arguments: --batch-size
    16"); its --batch-size is the global batch, split over the processes as a run folder's is."""
    train = _estimate_json(capsys, "--batch-size", "8", "--seq-len", "32", "--nproc", "2")
    assert train == _estimate_json(capsys, "--batch", "4", "--seq", "32", "--gpus", "2")
    assert (train["settings"]["batch"], train["settings"]["seq"]) == (4, 32)
    at_least = "must be a whole number of at least 1, got"  # one wording for every count
    for argv, error in (
        (("--batch-size", "7", "--nproc", "2"), "does not split evenly over 2 GPUs; fix: --batch "
         "N (the micro-batch per device), or --nproc dividing 7"),  # it named --gpus
        (("--batch-size", "4", "--batch", "2"), "--batch 2 and --batch-size 4 both give the "),
        (("--batch-size", "0",), f"error: --batch-size {at_least} 0; fix: "),
        (("--batch-size", "0", "--gpus", "0"), f"error: --batch-size {at_least} 0"),  # --batch's
        (("--seq-len", "0",), f"error: --seq-len {at_least} 0; fix: "),  # "(--seq)"
        (("--nproc", "0",), f"error: --nproc {at_least} 0; fix: "),
    ):  # fmt: skip
        assert main(["estimate", "--model", "nano", *argv]) == 2
        err = capsys.readouterr().err
        assert error in err and len(err.strip().splitlines()) == 1


def test_a_run_folders_edited_batch_size_of_0_is_named_as_the_runs(tmp_path, capsys):
    """A config.yaml edited to ``batch_size: 0``: "batch must be a whole number ..." named
    neither the folder nor the setting."""
    from lowbit.train.config import TrainConfig, resolve, write

    write(resolve(TrainConfig(model="nano", out=str(tmp_path))), tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(re.sub(r"(?m)^batch_size: .*$", "batch_size: 0", config.read_text()))
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path}: the run's batch size must be a whole number of at least 1, got 0" in err
