"""Session 34: what a user of ``lowbit.train.train(TrainConfig(nproc=N))`` sees when the call is
not under ``if __name__ == "__main__":``, and when its ``on_step`` cannot reach the ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


def test_a_call_without_the_main_guard_names_the_guard(tmp_path):
    """Each spawned rank imports the calling script again and calls `train` once more: the
    caller gets one `UsageError` naming the guard, and no rank prints Python's bootstrapping
    traceback (before: one screenful per rank, then `RankFailed: rank 0 died (exit 1)`)."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys

            from lowbit.errors import UsageError
            from lowbit.train import TrainConfig, train

            # the digits CNN: the guard is the same for every task, and the ranks import
            # the script without transformers (seconds of CPU each)
            config = TrainConfig(
                nproc=2, task="image-classification", steps=1, batch_size=4,
                out={str(tmp_path / "run")!r},
            )
            try:
                train(config, quiet=True)
            except UsageError as error:
                sys.exit(f"lowbit: error: {{error}}")
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,  # two spawned ranks: about a minute on a busy machine
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert 'not under `if __name__ == "__main__":`' in lines[0]
    assert "fix: put the call under that guard" in lines[0]
    assert str(script) in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_on_step_the_ranks_cannot_be_sent_is_refused_before_they_start(tmp_path):
    """A lambda cannot be pickled for the spawned ranks: one `UsageError` naming the fix, before
    anything starts (before: multiprocessing's `PicklingError` traceback)."""
    config = TrainConfig(
        nproc=2, model="nano", steps=1, batch_size=4, seq_len=16, eval_batches=1,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"cannot be sent to the 2 spawned ranks.*fix: a function"):
        train(config, quiet=True, on_step=lambda trainer: None)
    assert not (tmp_path / "run").exists()
