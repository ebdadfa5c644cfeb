"""Session 43: a loss-scaled run whose loss stays non-finite stops as diverged. Loss scaling skips a
step whose loss is inf or NaN, but the skipped step leaves the weights that gave it: once they give
no finite loss on any batch, every later step was skipped, and the run said "completed"."""

import json
import re
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.train import NonFiniteLoss, train
from lowbit.train import checkpoint as ckpt
from lowbit.train import trainer as trainer_module

# fp16-mixed at lr 50 on the digits CNN: its first update takes the weights where the forward
# overflows, from step 2 on (as in tests/report/test_report_numbers_s40.py)
SETTINGS = ["--task", "image-classification", "--batch-size", "16", "--lr", "50"]
SETTINGS += ["--warmup-steps", "0", "--quiet"]
OVERFLOWING = [*SETTINGS, "--recipe", "fp16-mixed"]


def nan_at(steps, monkeypatch):
    """Every Trainer built from now on has a NaN loss at the (1-based) ``steps``: its gradients are
    NaN too, and loss scaling skips the step."""
    original_init = trainer_module.Trainer.__init__

    def init(self, *args, **kw):
        original_init(self, *args, **kw)
        loss = self.task.loss

        def patched(model, batch):
            value, count = loss(model, batch)
            return (value * float("nan") if self.step_idx + 1 in steps else value), count

        self.task.loss = patched

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)


def _info(run) -> dict:
    return json.loads((run / "run.json").read_text())


def test_weights_that_give_no_finite_loss_stop_the_run_as_diverged(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *OVERFLOWING, "--steps", "20", "--save-interval", "4", "--out", str(run)]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.search(r"loss is nan at steps (\d+)-(\d+), 8 in a row", error)
    assert found, error
    first, last = map(int, found.groups())
    assert last - first == 7 and last < 20
    assert "fix: lower --lr" in error and "use a loss-scaled" not in error  # it is one
    info = _info(run)
    assert info["status"] == "diverged" and info["step"] == last - 1
    # the checkpoints saved among the skipped steps hold the weights that gave them: said so
    kept = ckpt.latest(run)
    assert ckpt.step_of(kept) >= first - 1
    assert f"last checkpoint {kept} holds the weights of the non-finite steps" in error


def test_a_run_that_ends_with_a_non_finite_validation_loss_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *OVERFLOWING, "--steps", "4", "--out", str(run)]
    argv.remove("--quiet")  # the summary
    assert main(argv) == 0  # fewer non-finite steps in a row than stop a run
    out = capsys.readouterr().out
    assert _info(run)["status"] == "completed"
    header, warning = out[out.index("lowbit train:") :].splitlines()[:2]
    assert header.endswith("4 steps (completed)")
    assert re.fullmatch(
        r"  warning +validation loss is nan: the run diverged, its weights give no finite loss "
        r"\([1-4] of 4 steps skipped\); fix: lower --lr.*",
        warning,
    )


def test_fewer_non_finite_losses_in_a_row_are_skipped_and_the_run_goes_on(tiny_config, monkeypatch):
    nan_at({*range(2, 9), 10}, monkeypatch)  # 7 in a row, and one more after a finite step
    config = tiny_config("image-classification", steps=11, recipe="fp16-mixed")
    result = train(config, quiet=True)
    assert result.status == "completed" and result.steps == 11
    assert result.skipped_steps == 8


def test_eight_in_a_row_stop_it(tiny_config, monkeypatch):
    nan_at(range(2, 10), monkeypatch)
    config = tiny_config("image-classification", steps=11, recipe="fp16-mixed", save_interval=3)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at steps 2-9, 8 in a row") as error:
        train(config, quiet=True)
    assert "step-0000006.pt holds the weights of the non-finite steps" in str(error.value)
    assert _info(Path(config.out))["status"] == "diverged"


def test_a_run_resumed_among_its_non_finite_steps_stops_where_it_would_have(
    tiny_config, monkeypatch
):
    nan_at(range(3, 100), monkeypatch)
    config = tiny_config("image-classification", steps=6, recipe="fp16-mixed", save_interval=3)
    assert train(config, quiet=True).status == "completed"  # steps 3-6: 4 in a row
    config.steps = 20
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at steps 3-10, 8 in a row"):
        train(config, resume=True, quiet=True)
    assert _info(Path(config.out))["step"] == 9


def test_a_checkpoint_from_before_the_count_resumes_with_it(tiny_config, monkeypatch):
    """A checkpoint written before session 43 holds no count: the run's recent losses give it (a
    resume started counting at 0 and named steps 7-14 where the loss had been nan since step 3)."""
    nan_at(range(3, 100), monkeypatch)
    state_dict = trainer_module.Trainer.state_dict

    def without_count(self):
        state = state_dict(self)
        del state["trainer"]["nonfinite_in_row"]
        return state

    monkeypatch.setattr(trainer_module.Trainer, "state_dict", without_count)
    config = tiny_config("image-classification", steps=6, recipe="fp16-mixed", save_interval=3)
    assert train(config, quiet=True).status == "completed"
    monkeypatch.setattr(trainer_module.Trainer, "state_dict", state_dict)
    config.steps = 20
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at steps 3-10, 8 in a row"):
        train(config, resume=True, quiet=True)


def test_a_recipe_that_diverges_so_in_a_study_is_reported_diverged(tmp_path):
    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32,fp16-mixed", *SETTINGS]
    argv += ["--steps", "10", "--seeds", "1", "--no-plots", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "runs/fp16-mixed/seed-0/compare.json").read_text())
    assert re.match(r"loss is nan at steps \d+-\d+, 8 in a row", record["diverged"])
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["recipes"]["fp16-mixed"]["verdict"].startswith("FAIL: diverged")
