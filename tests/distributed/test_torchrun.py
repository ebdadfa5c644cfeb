"""`torchrun -m lowbit train`: the ranks torchrun starts train one run together."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.distributed.helpers import DIGITS


def test_torchrun_without_a_strategy_trains_one_ddp_run(tmp_path):
    """Without --strategy each rank trained a run of its own into the same folder."""
    torchrun = Path(sys.executable).with_name("torchrun")
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in DIGITS.items() if k != "eval_interval"]
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "lowbit", "train", *settings]
    command += ["--steps", "2", "--eval-interval", "2", "--quiet", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["nproc"], config["strategy"]) == (2, "ddp")
    # one run, summed up by rank 0
    assert done.stdout.count("lowbit train: image-classification") == 1, done.stdout
