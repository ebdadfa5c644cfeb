"""Training memory: `estimate` it from a model config and recipe, `measure` it on a live run."""

from lowbit.memory.breakdown import COMPONENTS, Breakdown, human
from lowbit.memory.estimate import estimate  # the function shadows its module's name here
from lowbit.memory.measure import measure, measure_activations, tensor_bytes

__all__ = [
    "COMPONENTS",
    "Breakdown",
    "estimate",
    "human",
    "measure",
    "measure_activations",
    "tensor_bytes",
]
