"""Less travelled paths of multi-process runs: their checkpoints read by one-process commands."""

from __future__ import annotations

import pytest
import torch

from lowbit.train import TrainConfig, evaluate_run, train
from tests.distributed.helpers import TINY


@pytest.fixture
def restore_safe_globals():
    allowed = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)


def test_lowbit_eval_reads_a_checkpoint_with_quantized_optimizer_states(
    tmp_path, restore_safe_globals
):
    """torchao's 8-bit states are pickled objects in a DCP checkpoint: reading the whole folder in
    a fresh process (`lowbit eval RUN`) failed with a CheckpointException, though eval, quantize
    and generate need only the weights."""
    out = tmp_path / "run"
    config = TrainConfig(
        steps=1, out=str(out), recipe="bf16-low", optimizer_state="8bit", strategy="fsdp", **TINY
    )
    result = train(config, quiet=True)
    # weights_only unpickling as in a fresh process, where torchao, which allows its state
    # classes when imported, is not imported yet
    torch.serialization.clear_safe_globals()
    metrics, _ = evaluate_run(out, max_batches=TINY["eval_batches"])
    assert metrics["loss"] == pytest.approx(result.final_metrics["loss"], rel=1e-4)


def test_measuring_the_activations_of_an_fsdp_model_is_a_one_line_error(tmp_path):
    """FSDP frees and reuses each block's gathered parameters: storages identify nothing there
    (it raised 'invalid python storage' from inside the forward)."""
    from lowbit.distributed.context import join
    from lowbit.errors import UsageError
    from lowbit.memory.measure import measure_activations
    from lowbit.train import Trainer

    ranks = join("fsdp", torch.device("cpu"))
    try:
        trainer = Trainer(
            TrainConfig(out=str(tmp_path / "run"), strategy="fsdp", **TINY), dist=ranks
        )
        batch = next(trainer.task.train_batches)
        with pytest.raises(UsageError, match="needs an unsharded model"):
            measure_activations(trainer.model, lambda: trainer.task.loss(trainer.model, batch)[0])
    finally:
        ranks.close()
