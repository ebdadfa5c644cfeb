"""Session 41: a global batch that does not split over the processes was refused with "fix: use a
multiple of 3 or another --nproc", which named no count that works, and whose first half a resume
(which keeps the run's batch size and may change only --nproc) cannot follow."""

from __future__ import annotations

import re

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, resolve


@pytest.mark.parametrize(
    ("batch", "nproc", "fix"),
    [(8, 3, "--nproc 2 or 4 (a divisor of 8)"), (7, 2, "--nproc 1 or 7 (a divisor of 7)")],
)
def test_the_fix_names_the_nearest_process_counts_that_split_the_batch(batch, nproc, fix):
    with pytest.raises(
        UsageError, match=re.escape(f"over {nproc} processes; fix: {fix}, or in a new run")
    ):
        resolve(TrainConfig(batch_size=batch, nproc=nproc))


def test_a_count_above_the_batch_names_the_batch_itself(capsys):
    assert main(["train", "--nproc", "5", "--batch-size", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not split evenly over 5 processes; fix: --nproc 4 (a divisor of 4)," in err
