"""Session 35: an interrupted run's run.json keeps the metrics of the run's last validation,
across a resume and from the validation at step 0 (README: "the final_metrics of its last
validation with the final_metrics_step they were measured at")."""

import json
import math

import pytest

from lowbit.train import train


def _stop_at(step):
    def stop(trainer):
        trainer.stop_requested = trainer.step_idx == step

    return stop


def _info(result) -> dict:
    return json.loads((result.run_dir / "run.json").read_text(encoding="utf-8"))


def _validation_loss(result, step) -> float:
    records = map(json.loads, (result.run_dir / "metrics.jsonl").open())
    return next(r["loss"] for r in records if (r["step"], r["split"]) == (step, "validation"))


def test_a_resumed_run_stopped_before_its_next_validation_keeps_the_last_one(tiny_config):
    """Stopped at 4 (validated at 3), resumed and stopped at 5: run.json's final_metrics
    became {} and final_metrics_step null, as if the run had never been validated, and the
    summary said "(not evaluated in this session)"."""
    config = tiny_config(model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=7)
    config.eval_interval, config.warmup_steps = 3, 0
    assert train(config, quiet=True, on_step=_stop_at(4)).status == "interrupted"
    result = train(config, resume=True, quiet=True, on_step=_stop_at(5))
    info = _info(result)
    assert (info["status"], info["step"], info["final_metrics_step"]) == ("interrupted", 5, 3)
    assert info["final_metrics"]["loss"] == _validation_loss(result, 3)
    line = next(x for x in result.summary().splitlines() if "validation loss" in x)
    assert f"-> {info['final_metrics']['loss']:.4f}" in line and line.endswith("(at step 3)")


def test_a_run_stopped_before_its_first_validation_reports_step_0s(tiny_config):
    """The validation at step 0 is the run's last one until the first interval: the summary
    said "(not evaluated in this session)" of a session that had evaluated it."""
    config = tiny_config(model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=7)
    config.eval_interval = 3
    result = train(config, quiet=True, on_step=_stop_at(1))
    info = _info(result)
    assert (info["status"], info["step"], info["final_metrics_step"]) == ("interrupted", 1, 0)
    assert info["final_metrics"]["loss"] == _validation_loss(result, 0)
    assert "not evaluated" not in result.summary()


@pytest.mark.parametrize("nan_at, stop_at", [(0, 1), (3, 4)])
def test_a_nan_validation_is_null_in_run_json_and_nan_in_the_summary(
    tiny_config, monkeypatch, nan_at, stop_at
):
    """run.json's None for a NaN loss was written into the run's own metrics (the step-0
    validation's, or the last interval's), and the summary then crashed formatting None."""
    from lowbit.train.trainer import Trainer

    evaluate = Trainer.evaluate

    def overflowed(self, *args, **kwargs):
        out = evaluate(self, *args, **kwargs)
        return {**out, "loss": math.nan} if self.step_idx == nan_at else out

    monkeypatch.setattr(Trainer, "evaluate", overflowed)
    config = tiny_config(model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=7)
    config.eval_interval = 3
    result = train(config, quiet=True, on_step=_stop_at(stop_at))
    assert _info(result)["final_metrics"]["loss"] is None
    assert math.isnan(result.final_metrics["loss"])
    assert "validation loss" in result.summary()
