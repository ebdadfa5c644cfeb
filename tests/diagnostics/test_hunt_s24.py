"""Cases found by a bug hunt through the diagnostics' public interfaces (session 24)."""

import math

import pytest

from lowbit.diagnostics.doctor import diagnose
from lowbit.train.config import resolve
from lowbit.train.trainer import Trainer


@pytest.mark.parametrize("recipe", ["bf16-pure-sr", "bf16-pure-kahan"])
def test_doctor_does_not_flag_updates_that_stochastic_rounding_or_kahan_keep(lm_config, recipe):
    """Updates below half the bf16 spacing are lost under round-to-nearest only: stochastic
    rounding keeps them in expectation, Kahan summation in its buffer. Both recipes were flagged
    for them, with themselves as the fix."""
    config = resolve(lm_config(model="nano", recipe=recipe, lr=1e-5))
    flags = diagnose(config, steps=1).flags
    assert "bf16-updates-rounded-away" not in {f["pattern"] for f in flags}
    nearest = diagnose(resolve(lm_config(model="nano", recipe="bf16-pure", lr=1e-5)), steps=1)
    assert "bf16-updates-rounded-away" in {f["pattern"] for f in nearest.flags}


def test_a_check_step_that_the_guard_retried_still_decides_the_plan(lm_config):
    """A transient overflow in the first step: the guard retried it, and the retried attempt ran
    as a statistics step, so the first plan waited for step 2 (a periodic check: for the next
    interval) while the ladder went on being measured at later statistics steps."""
    trainer = Trainer(lm_config(model="nano", recipe="auto", steps=2), quiet=True)
    layer = trainer.model.model.layers[1].mlp.down_proj
    original = layer.forward
    calls = []

    def overflows_once(x):
        calls.append(1)
        return original(x) * (math.inf if len(calls) == 1 else 1.0)

    layer.forward = overflows_once
    out = trainer.step()
    assert math.isfinite(out["loss"]) and out["stepped"]
    auto = dict(trainer.records)["auto"]
    assert auto["retries"] == 1
    assert auto["n_fp8"] == 126 and auto["changes"] == 126  # planned at step 1, as unretried
    assert [entry["step"] for entry in trainer.monitor.controller.history] == [1]


def test_doctor_of_an_auto_probe_that_stays_non_finite_diagnoses_its_last_attempt(lm_config):
    """A step that stays non-finite through the guard's retries: the guard had read the last
    attempt's statistics, so the probe found none and printed an empty table that said the
    recipe keeps every layer in high precision."""

    def blows_up(trainer):
        layer = trainer.model.model.layers[1].mlp.down_proj
        original = layer.forward
        layer.forward = lambda x: original(x) * math.inf

    diagnosis = diagnose(resolve(lm_config(model="nano", recipe="auto")), 2, prepare=blows_up)
    assert diagnosis.stopped == "probe stopped: loss is nan at step 1"
    assert len(diagnosis.rows) == 126
    reasons = {(r.layer, r.operand): r.reason for r in diagnosis.rows}
    assert reasons[("model.layers.2.self_attn.q_proj", "forward.x")] == "non-finite"
    assert "no layer of this model" not in diagnosis.table()
