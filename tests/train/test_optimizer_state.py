"""`lowbit train --optimizer-state` and the measured-vs-estimated memory table of a run."""

import pytest

from lowbit.errors import UsageError
from lowbit.optim.states import state_bytes_per_param
from lowbit.train import train


@pytest.mark.parametrize("state", ["fp32", "bf16"])
def test_optimizer_state_precision_is_used_and_memory_matches_the_estimate(tiny_config, state):
    result = train(tiny_config(steps=3, eval_interval=3, optimizer_state=state), quiet=True)
    table = result.extra["memory_table"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    # estimate and measurement of the model states agree to the byte
    for component in ("parameters", "gradients", "optimizer"):
        row = rows[component]
        numbers = [cell for cell in row if cell.replace(",", "").isdigit()]
        assert numbers[0] == numbers[-1], row
    assert "memory (per component" in result.summary()
    # bf16 states hold half the bytes of fp32 states for the large matrices
    assert state_bytes_per_param(state, 1 << 20) == {"fp32": 8, "bf16": 4}[state]


def test_unknown_optimizer_state_lists_the_valid_ones(tiny_config):
    with pytest.raises(UsageError, match="valid optimizer state precisions: fp32, bf16"):
        train(tiny_config(steps=1, optimizer_state="fp2"), quiet=True)


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("task", ["causal-lm", "token-classification"])
def test_a_runs_activations_are_the_estimate_to_the_byte(tiny_config, task, recipe):
    # the estimator traces the task's forward and loss on fake tensors (lowbit.memory.estimate)
    result = train(tiny_config(task, steps=2, eval_interval=2, recipe=recipe), quiet=True)
    rows = {line.split()[0]: line.split() for line in result.extra["memory_table"].splitlines()}
    for component in ("activations", "temporary"):
        # ... estimate, its size and unit, bytes per parameter, measured, its size and unit
        estimated, measured = rows[component][-7], rows[component][-3]
        assert estimated == measured, rows[component]


def test_the_summarys_state_bytes_count_quantized_states_by_what_they_hold(tiny_config, tmp_path):
    """8-bit states hold about a quarter of fp32's bytes; the summary counted them as fp32."""
    sizes = {
        state: train(
            tiny_config(steps=1, eval_interval=1, optimizer_state=state, out=str(tmp_path / state)),
            quiet=True,
        )
        for state in ("fp32", "8bit")
    }
    full, quantized = (sizes[s].tensor_mb for s in ("fp32", "8bit"))
    # parameters (4 bytes) + states (8 fp32, ~2 in 8-bit) per parameter: about 12 against 6
    assert quantized < 0.7 * full


def test_an_emulated_recipes_memory_table_says_what_its_estimate_models(tiny_config):
    result = train(tiny_config(steps=2, eval_interval=2, recipe="fp8-tensorwise"), quiet=True)
    assert "the estimate is a GPU storing the formats natively" in result.extra["memory_table"]
