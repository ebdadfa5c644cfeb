"""Session 32: the ``auto`` recipe as a demanding user runs it."""

from lowbit.diagnostics.auto import plan_over_time
from lowbit.train import train


def test_plan_over_time_reads_a_run_whose_every_layer_an_override_pins(lm_config):
    """Every layer pinned by an override leaves the plan no operands: its share and mean bits are
    None, which the metrics log leaves out of the record, and the timeline (`lowbit doctor
    --checkpoint RUN` prints it) failed with a KeyError on the missing key."""
    config = lm_config(model="nano", recipe="auto", steps=1, overrides=["*=fp8-tensorwise"])
    result = train(config, quiet=True)
    timeline = plan_over_time(result.run_dir)
    assert "| 1 | 0 | 0 | 0 | n/a | n/a | 0 | 0 |" in timeline.splitlines()
