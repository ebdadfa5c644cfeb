"""lowbit: train language models in mixed and low precision, and measure what it costs."""

from lowbit.nn import convert
from lowbit.precision import Precision
from lowbit.recipes import Recipe, get_recipe
from lowbit.recipes import names as recipe_names

__version__ = "0.1.0"

__all__ = ["Precision", "Recipe", "__version__", "convert", "get_recipe", "recipe_names"]
