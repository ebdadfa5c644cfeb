"""Session 36: a `lowbit compare` of a study one of whose runs another process is training is
refused before it writes anything: it wrote the run's load file (and the study's settings) first,
and with --overwrite cleared the live run's files, before the trainer's lock refused it."""

import pytest

from lowbit.errors import UsageError
from lowbit.report import compare, make_study
from lowbit.train import TrainConfig, train
from lowbit.train.runstate import RunLock

SETTINGS = {"task": "causal-lm", "model": "nano", "seq_len": 16, "batch_size": 4}


def _files(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_study_whose_run_is_live_is_refused_before_anything_is_written(tmp_path):
    study = make_study("fp32", {**SETTINGS, "steps": 2, "eval_batches": 1}, seeds=[0], out=tmp_path)
    run_dir = study.run_dir("fp32", 0)
    config = TrainConfig(**{**study.base, "recipe": "fp32", "seed": 0, "out": str(run_dir)})

    def stop(trainer):
        trainer.stop_requested = True

    # a run of the study with a checkpoint at step 1, as one still training leaves it
    assert train(config, quiet=True, on_step=stop).status == "interrupted"
    before = _files(tmp_path)
    live = RunLock(run_dir)  # held as the process that trains it holds it
    live.take()
    try:
        for overwrite in (False, True):
            with pytest.raises(UsageError, match=r"another lowbit process.* is training into"):
                compare(study, overwrite=overwrite, plots=False, log=lambda line: None)
            assert _files(tmp_path) == before
    finally:
        live.release()
