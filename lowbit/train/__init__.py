"""Training runs: configuration, the loop against the `lowbit.Precision` hooks, checkpoints,
tracking, and loading a run back to evaluate or sample from it."""

from lowbit.errors import RunNotWritten
from lowbit.train.config import TrainConfig, build_config, load_file, lr_at, resolve
from lowbit.train.evaluate import evaluate_run, load_run
from lowbit.train.generate import sample_text
from lowbit.train.trainer import NonFiniteLoss, RunResult, Trainer, train

__all__ = [
    "NonFiniteLoss",
    "RunNotWritten",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "build_config",
    "evaluate_run",
    "load_file",
    "load_run",
    "lr_at",
    "resolve",
    "sample_text",
    "train",
]
