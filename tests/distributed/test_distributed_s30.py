"""Session 30: what a user of ``--nproc`` reads in the summary and on stderr, and a one-process
group that trains what one process trains. Session 29's FSDP2 token classifier shares this
module's one ``--nproc 2`` run (a launch costs seconds of CPU a rank)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile

import pytest

from lowbit.cli import main
from lowbit.train import TrainConfig, train
from tests.distributed.helpers import TINY
from tests.once import once_per_session
from tests.train.test_run_data import _conll_folder


@contextlib.contextmanager
def _file_descriptor_2(into: io.StringIO):
    """Within: what is written to file descriptor 2 (the spawned ranks' stderr) goes to ``into``
    (``contextlib.redirect_stderr`` takes this process's ``sys.stderr`` alone)."""
    with tempfile.TemporaryFile("w+") as file:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            into.write(file.read())


@pytest.fixture(scope="module")
def two_ranks_on_one_core(tmp_path_factory):
    """(stdout, stderr: the launcher's and its ranks') of a one-step ``lowbit train --nproc 2``
    of a token classifier under FSDP2 on a machine of one core, launched once per session."""
    return once_per_session(tmp_path_factory, "s30-two-ranks", lambda: _launch(tmp_path_factory))


def _launch(tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("s30") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "batch_size": 4}.items()]
    flags += ["--task=token-classification", "--strategy=fsdp", "--steps=1", "--nproc=2"]
    # a few CoNLL sentences: each rank tagged and encoded the built-in task's source tree first
    # (seconds of CPU a rank), and nothing checked here comes from the data
    flags += [f"--data={_conll_folder(out.parent / 'conll')}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("LOWBIT_DIST_TIMEOUT", "120")
        patch.setattr("os.cpu_count", lambda: 1)  # the launcher's count; the ranks are spawned
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            _file_descriptor_2(stderr),
        ):
            code = main(["train", *flags, "--out", str(out), "--quiet"])
    assert code == 0, stderr.getvalue()
    return stdout.getvalue(), stderr.getvalue()


def test_the_summary_says_its_memory_is_rank_0s(two_ranks_on_one_core):
    """The peak memory line of a two-process run was rank 0's figure with nothing saying so: read
    as the run's, it halved what the machine held (under FSDP2 rank 0's shards, more so)."""
    stdout, _ = two_ranks_on_one_core
    line = next(line for line in stdout.splitlines() if "peak memory" in line)
    assert line.endswith("(rank 0's, one of 2 processes)"), line


def test_more_processes_than_cores_is_a_warning(two_ranks_on_one_core):
    """--nproc above the core count ran the ranks one thread each, taking turns on the cores,
    without a word: slower than fewer processes, where the user asked for more to go faster."""
    _, stderr = two_ranks_on_one_core
    assert (
        "lowbit: warning: --nproc 2 CPU processes on 1 cores: the ranks share cores and train "
        "slower than fewer would; fix: --nproc 1 or fewer"
    ) in stderr
    assert stderr.count("lowbit: warning: --nproc") == 1


def test_token_classification_under_fsdp_prints_no_view_warning_per_rank(two_ranks_on_one_core):
    """Session 29: FSDP2's "returned a view tensor" warning about the token classifier's logits
    (which the task only reads) was printed by every rank."""
    stdout, stderr = two_ranks_on_one_core
    assert "lowbit train: token-classification" in stdout and "(completed)" in stdout
    assert "returned a view tensor" not in stderr


def _train_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_a_one_process_group_trains_a_token_classifier_as_one_process(tmp_path, monkeypatch):
    """A one-process run measures its memory at step 2 with an extra forward, which drew the
    tagger's dropout masks from the run's generator: every later step's masks moved, and the same
    run with --strategy ddp (no memory report) had another loss from step 3 on (2.4762 against
    2.4677), where a group of one is documented to draw exactly what one process draws."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = str(_conll_folder(tmp_path / "conll"))  # a few sentences: the built-in task's tagging
    settings = dict(task="token-classification", data=data, recipe="fp32", steps=3, batch_size=8)
    settings.update(eval_batches=1, eval_interval=100)
    one = train(TrainConfig(out=str(tmp_path / "one"), **settings), quiet=True)
    group = train(TrainConfig(out=str(tmp_path / "ddp"), strategy="ddp", **settings), quiet=True)
    assert "memory_table" in one.extra  # the report ran in the one process
    assert _train_losses(group.run_dir) == _train_losses(one.run_dir)
