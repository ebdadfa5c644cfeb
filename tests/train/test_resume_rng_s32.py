"""A run resumed in the process that trained it saves the Python `random` state an uninterrupted
run saves, whatever the process imported before."""

import random

import torch

from lowbit.train import checkpoint as ckpt
from lowbit.train import train
from lowbit.train import trainer as trainer_module


def test_an_in_process_resume_saves_the_python_random_state_of_an_uninterrupted_run(
    tiny_config, tmp_path, monkeypatch
):
    # the first task a process builds imports its data's libraries, and one of them draws from
    # Python's `random` as it loads (rich, through scikit-learn's digits): a draw on the first
    # build only, as an import makes it
    build_task, built = trainer_module.build_task, []

    def first_build_imports(*args, **kwargs):
        if not built:
            built.append(random.getrandbits(24))
        return build_task(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_task", first_build_imports)
    settings = dict(batch_size=8, steps=4, eval_interval=2)
    train(tiny_config("image-classification", **settings, out=str(tmp_path / "a")), quiet=True)

    def halt(trainer):
        trainer.stop_requested = trainer.step_idx == 2

    config = tiny_config("image-classification", **settings, out=str(tmp_path / "b"))
    assert train(config, quiet=True, on_step=halt).status == "interrupted"
    assert train(config, resume=True, quiet=True).steps == 4
    straight, resumed = (ckpt.load(ckpt.latest(tmp_path / run))["rng"] for run in "ab")
    assert resumed["python"] == straight["python"]
    assert torch.equal(resumed["torch"], straight["torch"])
