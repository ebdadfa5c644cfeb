"""Data-parallel training beyond one process: DDP and FSDP2, launched by ``--nproc`` or torchrun.

`launch.train` runs a `TrainConfig` whose ``strategy`` is set: in this process under torchrun (or
with one process), else in ``nproc`` spawned processes. Each rank builds a `Ranks` context
(`context.join`), which the trainer asks to shard data, wrap the model, reduce metrics and write
checkpoints; one process without a strategy uses `context.SINGLE`, whose every hook is a no-op.
"""

from lowbit.distributed.context import SINGLE, STRATEGIES, RankFailed, Ranks, SingleProcess

__all__ = ["SINGLE", "STRATEGIES", "RankFailed", "Ranks", "SingleProcess"]
