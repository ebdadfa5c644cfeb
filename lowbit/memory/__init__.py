"""Training memory: `estimate` it from a model config and recipe, `measure` it on a live run."""

from lowbit.memory.breakdown import COMPONENTS, Breakdown, human
from lowbit.memory.measure import measure, measure_activations, tensor_bytes

__all__ = ["COMPONENTS", "Breakdown", "human", "measure", "measure_activations", "tensor_bytes"]
