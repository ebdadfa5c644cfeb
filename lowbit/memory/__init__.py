"""Training memory: `estimate` it from a model config and recipe, `measure` it on a live run."""

from lowbit.memory.breakdown import COMPONENTS, Breakdown, human
from lowbit.memory.estimate import estimate  # the function shadows its module's name here
from lowbit.memory.measure import checkpointed_peak, measure, measure_activations, tensor_bytes

__all__ = [
    "COMPONENTS",
    "Breakdown",
    "checkpointed_peak",
    "estimate",
    "human",
    "measure",
    "measure_activations",
    "tensor_bytes",
]
