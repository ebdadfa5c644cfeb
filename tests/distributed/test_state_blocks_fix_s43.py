"""Session 43: FSDP's refusal of a process count that splits the blocks of 8-bit optimizer states
named counts that the global batch does not split into: `lowbit train --model tiny --nproc 3
--batch-size 6 --strategy fsdp --optimizer-state 8bit` said "fix: --nproc 2 or 4", and --nproc 4
was then refused ("batch size 6 (the global batch) does not split evenly over 4 processes")."""

from __future__ import annotations

import re

from lowbit.cli import main

RUN = ["train", "--model", "tiny", "--strategy", "fsdp", "--optimizer-state", "8bit"]
RUN += ["--steps", "1", "--seq-len", "16"]


def suggested_counts(capsys, out, nproc: int, batch: int) -> list[int]:
    argv = [*RUN, "--nproc", str(nproc), "--batch-size", str(batch), "--out", str(out)]
    assert main(argv) == 2
    assert not out.exists()  # refused before anything is written
    err = capsys.readouterr().err
    found = re.search(r"splits the 256-value blocks .*; fix: --nproc ([0-9 or]+), or", err)
    assert found, err
    return [int(n) for n in found.group(1).split(" or ")]


def test_the_counts_suggested_for_whole_blocks_split_the_global_batch(capsys, tmp_path):
    counts = suggested_counts(capsys, tmp_path / "run", 3, 6)
    assert counts and all(6 % n == 0 for n in counts), counts


def test_a_batch_that_every_suggested_count_splits_keeps_the_nearest_counts(capsys, tmp_path):
    assert suggested_counts(capsys, tmp_path / "run", 3, 12) == [2, 4]
