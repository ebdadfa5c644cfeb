"""Session 34: a warmup as long as the run is warned of by every entry point, once; an
interrupted run's run.json says the step of its final metrics."""

import json

from lowbit.cli import main
from lowbit.train import train

WARNING = "is not below the run's"
LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def _warned(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if WARNING in line]


def _stop_at_2(trainer):
    trainer.stop_requested = trainer.step_idx == 2


def test_a_python_runs_long_warmup_is_warned_of_once_and_not_on_resume(tiny_config, capsys):
    """``train(TrainConfig(steps=3, warmup_steps=100))`` trained at a fraction of its lr, never
    decaying, without a word: only `lowbit train` checked a run of --steps. Its resumed part is
    not warned again; the task's default warmup (20) over 3 steps is not warned of."""
    config = tiny_config(model="nano", seq_len=16, eval_batches=1, steps=3, warmup_steps=100)
    assert train(config, quiet=True, on_step=_stop_at_2).status == "interrupted"
    warned = _warned(capsys)
    assert len(warned) == 1 and warned[0].endswith("below 3, or more --steps"), warned
    assert train(config, resume=True, quiet=True).status == "completed"
    assert _warned(capsys) == []
    default = tiny_config(model="nano", seq_len=16, eval_batches=1, steps=3)
    assert train(default, overwrite=True, quiet=True).status == "completed"
    assert _warned(capsys) == []


def test_a_ranked_epochs_runs_long_warmup_is_warned_of(tiny_config, capsys):
    """A run with a --strategy (ranks: --nproc, torchrun) of --epochs went past `train`'s check
    of an --epochs run, to the ranks' trainer, and was not warned of."""
    config = tiny_config(
        "image-classification", epochs=0.05, warmup_steps=100, strategy="ddp", eval_batches=1
    )
    assert train(config, quiet=True).status == "completed"
    warned = _warned(capsys)
    assert len(warned) == 1 and warned[0].endswith("or more --epochs"), warned


def test_a_compare_studys_long_warmup_is_warned_of_once(tmp_path, capsys):
    """`lowbit compare --warmup-steps 5 --steps 2` trained every run without a word: the check
    was `lowbit train`'s. Said once for the study, not once for each of its runs."""
    argv = ["compare", *LM_FLAGS, "--steps", "2", "--eval-interval", "2", "--warmup-steps", "5"]
    argv += ["--seeds", "2", "--recipes", "fp32,bf16-mixed", "--quiet", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path / "study")]) == 0
    warned = _warned(capsys)
    assert len(warned) == 1 and warned[0].endswith("below 2, or more --steps"), warned


def test_an_interrupted_runs_run_json_says_the_step_of_its_final_metrics(tiny_config):
    """Stopped at step 4 after a validation at step 3, run.json read "step": 4 beside the
    final_metrics of step 3, which read as the metrics of the checkpoint at step 4."""

    def stop(trainer):
        trainer.stop_requested = trainer.step_idx == 4

    config = tiny_config(model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=7)
    config.eval_interval, config.warmup_steps = 3, 0
    result = train(config, quiet=True, on_step=stop)
    info = json.loads((result.run_dir / "run.json").read_text(encoding="utf-8"))
    assert (info["status"], info["step"], info["final_metrics_step"]) == ("interrupted", 4, 3)
    records = map(json.loads, (result.run_dir / "metrics.jsonl").open())
    at_3 = next(r for r in records if (r["step"], r["split"]) == (3, "validation"))
    assert info["final_metrics"]["loss"] == at_3["loss"]
    result = train(config, resume=True, quiet=True)
    info = json.loads((result.run_dir / "run.json").read_text(encoding="utf-8"))
    assert (info["status"], info["step"], info["final_metrics_step"]) == ("completed", 7, 7)
