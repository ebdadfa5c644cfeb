"""Follow-ups of session 26's hunt: a checkpoint of another run that differs only in what a
resume may change (--steps, --out) given to `eval`."""

import shutil

import pytest

from lowbit.cli import main
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module

TINY_LM = {"model": "nano", "seq_len": 32, "batch_size": 8, "eval_batches": 1, "recipe": "fp32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same model, data, recipe and seed, of 1 and 2 steps."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
        for name, steps in (("a", 1), ("c", 2)):
            train(TrainConfig(**TINY_LM, steps=steps, out=str(folder / name)), quiet=True)
    return folder / "a", folder / "c"


def test_a_checkpoint_of_a_run_differing_only_in_steps_and_out_is_refused(runs, capsys):
    """Its settings differ only in what `--resume` may change, so it was evaluated under this
    run's name without a word."""
    a, c = runs
    other = c / "checkpoints" / "step-0000002.pt"
    assert main(["eval", str(a), "--checkpoint", str(other), "--max-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{other}: a checkpoint of another run" in err and "out" in err
    assert len(err.strip().splitlines()) == 1


def test_a_copy_of_the_runs_own_checkpoint_elsewhere_is_taken(runs, tmp_path, capsys):
    a, _ = runs
    copy = tmp_path / "backup.pt"
    shutil.copy(a / "checkpoints" / "step-0000001.pt", copy)
    assert main(["eval", str(a), "--checkpoint", str(copy), "--max-batches", "1"]) == 0
    assert capsys.readouterr().out.startswith("causal-lm nano, recipe fp32, backup.pt")


def test_a_run_folder_that_cannot_be_written_is_one_line_from_any_command(monkeypatch, capsys):
    """`lowbit compare` (or doctor) training into a full disk: the trainer's one-line error,
    not a traceback, whichever command trained."""
    from lowbit.commands import compare
    from lowbit.train import RunNotWritten

    def full_disk(args):
        raise RunNotWritten("runs/x: cannot write the run at step 3 (No space left on device)")

    monkeypatch.setattr(compare, "run", full_disk)
    assert main(["compare", "--recipes", "fp32"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "lowbit: error: runs/x: cannot write the run at step 3 (No space left on device)\n"
    )


def test_a_choice_names_its_valid_values_in_english(capsys):
    assert main(["train", "--strategy", "foo", "--steps", "1"]) == 2
    assert "unknown strategy 'foo'; valid strategies: ddp, fsdp" in capsys.readouterr().err
