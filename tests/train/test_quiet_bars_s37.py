"""Session 37: a quiet run turns transformers' progress bars off without importing transformers
where it can; where ``HF_HUB_DISABLE_PROGRESS_BARS`` is set false (which pins huggingface_hub's
switch, not transformers'), transformers' own switch is turned as before, so a quiet fine-tuning
run prints no "Loading weights" bar (the review of that change found one)."""

import os
import subprocess
import sys

from tests.train.test_tagging_walk_s37 import IOB2, _bert_folder, _conll_folder


def test_a_quiet_run_shows_no_loading_bar_with_the_hubs_bars_pinned_on(tmp_path):
    model = _bert_folder(tmp_path / "bert", positions=32)
    data = _conll_folder(tmp_path / "data", IOB2 * 4, IOB2)
    argv = ["train", "--task", "token-classification", "--model", str(model), "--data", str(data)]
    argv += ["--seq-len", "16", "--batch-size", "2", "--steps", "1", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", *argv, "--out", str(tmp_path / "run")],
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr, done.stderr
