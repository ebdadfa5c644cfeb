"""`lowbit doctor` on runs that really are in trouble (session 43)."""

import re

from lowbit.diagnostics.doctor import diagnose
from lowbit.recipes import get_recipe
from lowbit.train.config import resolve


def test_the_rounded_away_fix_names_recipes_that_keep_the_updates(lm_config):
    """The fix read "bf16-pure-sr, bf16-pure-kahan or fp32 master weights": no recipe is named
    "fp32 master weights"; each name the fix gives is a --recipe that does not flag the case."""
    flags = diagnose(resolve(lm_config(recipe="bf16-pure", lr=1e-6)), steps=1).flags
    (detail,) = [f["detail"] for f in flags if f["pattern"] == "bf16-updates-rounded-away"]
    fix = detail.split("fix: ", 1)[1]
    assert fix.startswith("--recipe ")
    named = re.findall(r"\b(bf16-[a-z-]+)", fix)
    assert set(named) == {"bf16-pure-sr", "bf16-pure-kahan", "bf16-low"}
    for name in named:
        get_recipe(name)  # a recipe `lowbit train --recipe` takes
        kept = diagnose(resolve(lm_config(recipe=name, lr=1e-6)), steps=1).flags
        assert "bf16-updates-rounded-away" not in {f["pattern"] for f in kept}


def _nonfinite_probe(start_step):
    """A recorded probe of 2 steps from ``start_step`` whose first step's layer input is NaN
    before its cast (a run diverged upstream of the layer)."""
    nan = {"format": "fp16", "amax": float("nan"), "rms": float("nan"), "sqnr": float("nan")}
    fine = {"format": "fp16", "amax": 1.0, "rms": 1.0, "sqnr": 70.0, "nonfinite": 0.0}
    step = {"a": {"forward.x": fine}, "b": {"forward.x": {**nan, "nonfinite": 1.0}}}
    return {
        "per_step": [step, step],
        "order": ["a", "b"],
        "start_step": start_step,
        "loss_scales": [1.0, 1.0],
        "initial_loss_scale": 1.0,
        "dynamic_scaling": False,
        "rounded_away": [],
    }


def test_the_non_finite_input_step_is_not_called_a_probe_step_past_the_probe():
    """From a step-4 checkpoint, a 2-step probe said "at probe step 5": the run's step 5 is the
    probe's first. The line names both, and doctor.json's ``step`` stays the run's."""
    from lowbit.diagnostics.doctor import failure_patterns

    (flag,) = failure_patterns(_nonfinite_probe(4))
    assert flag["pattern"] == "non-finite-input" and flag["step"] == 5
    assert "at step 5 (probe step 1)" in flag["detail"], flag["detail"]
    (flag,) = failure_patterns(_nonfinite_probe(0))
    assert "at probe step 1," in flag["detail"] or "at probe step 1:" in flag["detail"]
