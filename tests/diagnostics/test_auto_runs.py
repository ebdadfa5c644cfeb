"""The `auto` recipes in whole training runs: the guard, resume and the logged plan, as a user
meets them through `lowbit train`."""

import math

from lowbit.recipes.auto import operand_spec
from lowbit.train.trainer import Trainer


def test_guard_with_gradient_accumulation_moves_up_only_the_layer_that_overflowed(lm_config):
    """A step's overflow in its first micro-batch: the guard's observed retry kept only the last
    (clean) micro-batch's statistics, found no culprit and moved all 126 operands up a rung."""
    trainer = Trainer(lm_config(model="nano", recipe="auto", steps=3, grad_accum=2), quiet=True)
    trainer.step()  # the first check plans fp8 everywhere on this model
    controller = trainer.monitor.controller
    culprit = "model.layers.1.mlp.down_proj"
    assert controller.plan[culprit]["forward.x"] == "fp8"
    layer = trainer.model.model.layers[1].mlp.down_proj
    original = layer.forward
    calls = []

    def overflows_in_fp8_on_the_first_micro_batch(x):
        calls.append(1)
        out = original(x)
        fp8 = layer.spec.forward.a == operand_spec("fp8", "forward.x")
        return out * math.inf if fp8 and len(calls) % 2 == 1 else out

    layer.forward = overflows_in_fp8_on_the_first_micro_batch
    out = trainer.step()
    assert math.isfinite(out["loss"]) and out["stepped"]
    changes = controller.history[-1]["changes"]
    assert {c["layer"] for c in changes} == {culprit}
    assert controller.plan[culprit]["forward.x"] == "mxfp8"
    assert controller.plan["model.layers.1.mlp.up_proj"]["forward.x"] == "fp8"


def test_plan_over_time_counts_the_guards_moves_as_changes(lm_config):
    """A step the guard retried moved 6 operands up, and the log said 0 changes beside counts
    per rung that had moved."""
    from lowbit.diagnostics.auto import plan_over_time

    def overflow_in_fp8_from_step_2(trainer):
        if trainer.step_idx != 1:
            return
        layer = trainer.model.model.layers[1].mlp.down_proj
        original = layer.forward

        def overflows_in_fp8(x):
            out = original(x)
            return (
                out * math.inf if layer.spec.forward.a == operand_spec("fp8", "forward.x") else out
            )

        layer.forward = overflows_in_fp8

    config = lm_config(model="nano", recipe="auto", steps=2)
    result = Trainer(config, quiet=True).fit(on_step=overflow_in_fp8_from_step_2)
    rows = plan_over_time(result.run_dir).splitlines()[2:]
    assert rows == [
        "| 1 | 126 | 0 | 0 | 100% | 8.00 | 126 | 0 |",
        "| 2 | 120 | 6 | 0 | 100% | 8.01 | 6 | 2 |",  # one unobserved, one observed failure
    ]
