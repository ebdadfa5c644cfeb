"""The table of every preset that docs/recipes.md shows (`lowbit recipes --markdown`)."""

from __future__ import annotations

from lowbit.recipes.presets import get_recipe, names
from lowbit.recipes.recipe import DTYPES, Recipe

ADAMW_FP32_STATE_BYTES = 8  # two fp32 moments per parameter


def _gemm(recipe: Recipe, gemm: str) -> str:
    if recipe.layer is None:
        return recipe.autocast or recipe.param_dtype
    spec = getattr(recipe.layer, gemm)
    text = f"{spec.a.describe()} · {spec.b.describe()}"
    if spec.transform.value != "none":
        text += f" (+{spec.transform.value})"
    return text


def bytes_breakdown(recipe: Recipe) -> str:
    """``params+grads+master+AdamW states = total`` bytes per parameter (fp32 optimizer states)."""
    from lowbit.memory.estimate import model_state_bytes_per_param

    param = DTYPES[recipe.param_dtype].itemsize
    total = model_state_bytes_per_param(recipe, "fp32")
    extra = int(total - 2 * param - ADAMW_FP32_STATE_BYTES)
    return f"{param}+{param}+{extra}+{ADAMW_FP32_STATE_BYTES} = {total:g}"


def _kept_names(recipe) -> list[str]:
    """The layer names the recipe keeps, each pattern's alternatives without their any-depth
    wildcards (``lm_head|*.lm_head`` is ``lm_head``), sorted."""
    names = {
        alternative.removeprefix("*.").removeprefix("*").removesuffix(".*")
        for override in recipe.overrides
        if override.layer is None
        for alternative in override.pattern.split("|")
    }
    return sorted(names)


def recipes_table(chosen: list[str] | None = None) -> str:
    """The table of the ``chosen`` recipes (every preset without), one row each."""
    header = (
        "| recipe | forward x·w | grad_input grad_out·w | grad_weight grad_out·x | other ops "
        "| params | master | loss scaling | update | bytes/param (w+g+master+states) | follows |"
    )
    lines = [header, "|" + "---|" * 11]
    for name in chosen or names():
        r = get_recipe(name)
        kept = ", ".join(_kept_names(r)) or "-"
        lines.append(
            f"| `{name}` | {_gemm(r, 'forward')} | {_gemm(r, 'grad_input')} | "
            f"{_gemm(r, 'grad_weight')} | {r.autocast or r.param_dtype} (kept: {kept}) | "
            f"{r.param_dtype} | {r.master_dtype or '-'} | {r.loss_scaling.value} | "
            f"{r.update_rounding.value} | {bytes_breakdown(r)} | {r.reference} |"
        )
    return "\n".join(lines)
