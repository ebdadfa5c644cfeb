"""Recipes (what precision every operand uses) and the named presets."""

from lowbit.recipes.presets import get_recipe, names, parse_override, register, same_recipe
from lowbit.recipes.recipe import (
    GemmSpec,
    LayerSpec,
    LossScaling,
    OperandSpec,
    Override,
    Recipe,
    Scaling,
    Transform,
    UpdateRounding,
    uniform_layer,
)

__all__ = [
    "GemmSpec",
    "LayerSpec",
    "LossScaling",
    "OperandSpec",
    "Override",
    "Recipe",
    "Scaling",
    "Transform",
    "UpdateRounding",
    "get_recipe",
    "names",
    "parse_override",
    "register",
    "same_recipe",
    "uniform_layer",
]
from lowbit.recipes import (  # noqa: I001 (registration order: presets, then fine-grained, auto)
    fine_grained,  # noqa: F401  (registers the fine-grained presets)
    auto,  # noqa: F401  (registers the dynamic-precision recipe)
)
