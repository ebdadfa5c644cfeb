"""Session 43: `lowbit estimate`'s FSDP note named device counts that the global batch does not
split into: `lowbit estimate --model RUN --gpus 3 --sharding fsdp --optimizer-state 8bit` for a
run of batch 6 said "fix: --gpus 2 or 4", and --gpus 4 was then refused ("the run's batch size 6
(its global batch) does not split evenly over 4 GPUs"). `lowbit train`'s refusal already took the
batch into account; both now share `rank_counts_keeping_state_blocks`."""

from __future__ import annotations

import re

from lowbit.cli import main

ESTIMATE = ["estimate", "--model", "nano", "--sharding", "fsdp", "--optimizer-state", "8bit"]


def suggested_gpus(capsys, argv: list[str]) -> list[int]:
    assert main([*ESTIMATE, *argv]) == 0
    err = capsys.readouterr().err
    found = re.search(r"splits the 256-value blocks .*; fix: --gpus ([0-9 or]+), or", err)
    assert found, err
    return [int(n) for n in found.group(1).split(" or ")]


def test_the_gpus_suggested_for_a_global_batch_split_it(capsys):
    counts = suggested_gpus(capsys, ["--gpus", "3", "--batch-size", "6"])
    assert counts and all(6 % n == 0 for n in counts), counts
    for n in counts:  # each is taken: no refusal of the batch, and no note of split blocks
        assert main([*ESTIMATE, "--gpus", str(n), "--batch-size", "6"]) == 0
        assert "splits the" not in capsys.readouterr().err


def test_a_per_device_batch_keeps_the_nearest_counts(capsys):
    # --batch is per device: any count keeps it, so the nearest counts are offered (2 and 4)
    assert suggested_gpus(capsys, ["--gpus", "3", "--batch", "3"]) == [2, 4]
