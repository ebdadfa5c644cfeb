"""Session 34: the memory table's note on emulated recipes is said only where its columns differ."""

import pytest

from lowbit.train import train
from tests.memory_table import memory_rows

NOTE = "the estimate is a GPU storing the formats natively"


@pytest.mark.parametrize("recipe", ["fp8-rowwise", "mxfp8"])
def test_a_recipe_whose_estimate_equals_the_run_says_no_emulation_note(tiny_config, recipe):
    """fp8-rowwise, blockwise, MX and NVFP4 keep their layers' inputs as they came, on a CPU as
    the estimate counts them (docs/memory.md): the note that "this CPU emulation saves other
    tensors" was printed under a table whose estimate and measurement were the same bytes."""
    result = train(tiny_config(steps=2, eval_interval=2, recipe=recipe), quiet=True)
    table = result.extra["memory_table"]
    rows = memory_rows(table)
    for label in ("activations", "temporary copies"):
        estimated, measured = rows[label]
        assert estimated == measured, table
    assert NOTE not in table
