"""Session 34: converted layers that keep their input as it came, estimated as the run saves it."""

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.memory import measure_activations
from lowbit.memory.estimate import estimate
from lowbit.models import build_causal_lm
from tests.memory_table import memory_rows


@pytest.mark.parametrize("recipe", ["fp8-rowwise", "mxfp8"])
def test_converted_layers_keeping_their_input_are_estimated_as_the_run_saves_it(recipe):
    """A converted layer whose weight gradient cannot reuse the quantized input keeps the input
    as it came (lowbit's autograd function: autocast casts nothing for it), one tensor for q, k and
    v; the estimate counted a bf16 copy per layer (6% over the measured activations of `nano`),
    and with that removed, lost tensors saved later in a freed input's storage."""
    batch, seq = 2, 32
    model = build_causal_lm("nano", 257, seed=0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    windows = torch.randint(0, 257, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = windows[:, :-1], windows[:, 1:]

    def forward():
        with precision.autocast():
            return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())

    saved = measure_activations(model, forward)
    estimated = estimate("nano", recipe, "fp32", batch, seq)
    assert estimated.activations == saved.activations
    assert estimated.temporaries == saved.temporaries


def test_a_checkpointed_encoders_kept_input_is_counted_once(tmp_path):
    """With activation checkpointing the block's input is kept by its checkpoint and read, as
    it came, by the block's first converted layers (BERT's q, k and v): the estimate counted it
    for both, one hidden state (32,768 bytes at 2 x 32) over the run's measured activations."""
    from lowbit.train import TrainConfig, train

    config = TrainConfig(
        task="token-classification", model="tiny", recipe="fp8-rowwise", batch_size=2,
        seq_len=32, steps=2, eval_interval=2, eval_batches=1, activation_checkpointing=True,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    table = train(config, quiet=True).extra["memory_table"]
    estimated, measured = memory_rows(table)["activations"]
    assert estimated == measured, table
