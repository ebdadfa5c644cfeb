"""Cases found by a bug hunt through the diagnostics' public interfaces (session 25)."""

import math

from lowbit.diagnostics.doctor import diagnose
from lowbit.diagnostics.stats import nominal_stats, unflatten
from lowbit.recipes.auto import operand_spec
from lowbit.train.config import resolve

DOWN_PROJ = "model.layers.1.mlp.down_proj"


def test_doctor_judges_an_operand_the_guard_moved_to_mxfp8_on_its_mxfp8_steps(lm_config):
    """`auto`'s fp8 (tensorwise) and MXFP8 rungs both logged their format as ``fp8_e4m3``: an
    operand the guard moved from one to the other within the probe had its fp8 and MXFP8 steps
    averaged into one row, judged against the nominal SQNR of the spec the step *started* in."""
    logged = []  # the forward.x statistics of DOWN_PROJ that each probe step logged

    def overflow_once_at_step_3(trainer):
        layer = trainer.model.model.layers[1].mlp.down_proj
        original, overflowed = layer.forward, []

        def forward(x):
            blow_up = trainer.step_idx == 2 and not any(overflowed)  # step 3's first attempt
            overflowed.append(blow_up)
            return original(x) * (math.inf if blow_up else 1.0)

        layer.forward = forward
        step = trainer.step

        def logging_step():
            out = step()
            logged.append(unflatten(dict(trainer.records)["stats"])[DOWN_PROJ]["forward.x"])
            return out

        trainer.step = logging_step

    config = resolve(lm_config(model="nano", recipe="auto", batch_size=2, seq_len=16))
    diagnosis = diagnose(config, 3, prepare=overflow_once_at_step_3)
    row = next(r for r in diagnosis.rows if (r.layer, r.operand) == (DOWN_PROJ, "forward.x"))
    assert row.sqnr == logged[2]["sqnr"]  # step 3 alone: the guard moved it up in that step
    assert row.nominal == nominal_stats(operand_spec("mxfp8", "forward.x"))["sqnr"]
    assert [s["spec"] for s in logged] == ["bf16", "fp8_e4m3/tensor", "fp8_e4m3/mx"]
    assert row.spec == "fp8_e4m3/mx" and " fp8_e4m3/mx " in diagnosis.table(top=200)
