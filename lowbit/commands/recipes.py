"""`lowbit recipes`: every preset, one line each (``--verbose``: the GEMM operand formats);
`lowbit recipes NAME...`: those recipes with their operand formats."""

from __future__ import annotations

import argparse

from lowbit.recipes import get_recipe, names

NAME = "recipes"
HELP = "List the recipe presets, one line each."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names",
        nargs="*",
        metavar="RECIPE",
        help="print only these recipes, with their GEMM operand specs (e.g. nvfp4 auto:fp4)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print each recipe's GEMM operand specs"
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the table of docs/recipes.md instead (the named recipes' rows)",
    )


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        from lowbit.recipes.table import recipes_table

        print(recipes_table(args.names))  # a name's row, as without --markdown
        return 0
    chosen = args.names or names()
    recipes = {name: get_recipe(name) for name in chosen}  # an unknown name fails listing all
    width = max(len(name) for name in chosen)
    for name, recipe in recipes.items():
        print(f"{name:<{width}}  {recipe.description}")
        if args.verbose or args.names:
            layer = recipe.layer.describe() if recipe.layer else "GEMMs in the compute dtype"
            print(
                f"{'':<{width}}    {layer}; params {recipe.param_dtype}"
                f"{', fp32 master' if recipe.master_dtype else ''}"
                f", loss scaling {_loss_scaling(recipe)}"
                f", update {recipe.update_rounding.value}  [{recipe.reference}]"
            )
    return 0


def _loss_scaling(recipe) -> str:
    """``none``, ``static (S)`` or ``dynamic (start S, x2 after N clean steps)``."""
    from lowbit.recipes import LossScaling

    kind = recipe.loss_scaling
    if kind is LossScaling.NONE:
        return "none"
    start = f"{recipe.initial_loss_scale:g}"
    if kind is LossScaling.STATIC:
        return f"static ({start})"
    return f"dynamic (start {start}, x2 after {recipe.loss_scale_growth_interval} clean steps)"
