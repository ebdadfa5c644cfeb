"""The ``auto`` recipe: per-layer, per-operand formats chosen while training (dynamic precision).

``auto`` starts every converted layer in bf16 and lets `lowbit.diagnostics.auto.AutoPrecision`
move each GEMM operand along the `LADDER` below, from the budget's rung (the lowest format
allowed) up to bf16, by the error it measures. ``auto`` allows fp8 and up; ``auto:fp6`` and
``auto:fp4`` allow the MX 6- and 4-bit formats. The output head stays in high precision, as in
every low-precision preset. Without the trainer's controller (``lowbit.Precision("auto")`` alone)
the recipe is plain bf16 GEMMs.
"""

from __future__ import annotations

from dataclasses import replace

from lowbit.errors import UsageError
from lowbit.formats import Granularity, ScaleRule
from lowbit.recipes.presets import BF16, KEEP_HIGH_PRECISION, register_preset
from lowbit.recipes.recipe import (
    OperandSpec,
    Override,
    Recipe,
    names_pattern,
    pattern_names,
    uniform_layer,
)


def _mx(fmt: str) -> OperandSpec:
    return OperandSpec(fmt, Granularity.MX, scale_rule=ScaleRule.MX_FLOOR)


# Rungs, cheapest first: (name, bits per element incl. scale overhead, weight/activation spec,
# output-gradient spec). fp8 tensorwise is torchao's float8 tensorwise recipe (e4m3 forward, e5m2
# gradients); MX rungs follow OCP MX v1.0 (32-element blocks, e8m0 scale: +8/32 bit per element)
# with the e2m3 / e3m2 split of Rouhani et al. 2023 for 6 bits.
LADDER: tuple[tuple[str, float, OperandSpec, OperandSpec], ...] = (
    ("fp4", 4.25, _mx("fp4_e2m1"), _mx("fp4_e2m1")),
    ("fp6", 6.25, _mx("fp6_e2m3"), _mx("fp6_e3m2")),
    ("fp8", 8.0, OperandSpec("fp8_e4m3"), OperandSpec("fp8_e5m2")),
    ("mxfp8", 8.25, _mx("fp8_e4m3"), _mx("fp8_e4m3")),
    ("bf16", 16.0, BF16, BF16),
)
RUNGS = tuple(rung[0] for rung in LADDER)
BUDGETS = ("fp8", "fp6", "fp4")  # lowest rung allowed: auto (= auto:fp8), auto:fp6, auto:fp4

AUTO = register_preset(
    Recipe(
        "auto",
        "dynamic precision: each operand the cheapest of fp8/mxfp8/bf16 within an error "
        "threshold, re-checked during training (auto:fp6, auto:fp4 allow MX 6/4-bit)",
        layer=uniform_layer(BF16),
        autocast="bf16",
        overrides=KEEP_HIGH_PRECISION,
        reference="lowbit (per-operand formats from measured SQNR and saturation)",
    )
)


def auto_recipe(budget: str) -> Recipe:
    """``auto:BUDGET``: the ``auto`` recipe whose lowest format is ``BUDGET`` (fp8, fp6, fp4)."""
    if budget not in BUDGETS:
        valid = ", ".join(f"auto:{b}" for b in BUDGETS)
        spelt = str(budget).strip().lower()  # a config file's 'auto:FP4' or 'auto: fp4'
        fix = f"; fix: did you mean 'auto:{spelt}'?" if spelt in BUDGETS else ""
        raise UsageError(f"unknown auto budget {budget!r}; valid: {valid}{fix}")
    if budget == "fp8":
        return AUTO
    cheapest = RUNGS[RUNGS.index(budget) : RUNGS.index("bf16")]
    # the MX rungs whose names do not say so (auto:fp6 has no fp4 to name)
    mx = " and ".join(rung for rung in reversed(cheapest) if rung in ("fp6", "fp4"))
    description = (
        f"dynamic precision: each operand the cheapest of {'/'.join(cheapest)}/bf16 within an "
        f"error threshold, re-checked during training ({mx} in MX blocks)"
    )
    return replace(AUTO, name=f"auto:{budget}", description=description)


def budget_of(recipe: Recipe) -> str | None:
    """The lowest rung of an ``auto`` recipe, None for every other recipe."""
    if recipe.name == "auto":
        return "fp8"
    if recipe.name.startswith("auto:"):
        return recipe.name.partition(":")[2]
    return None


def operand_spec(rung: str, operand: str) -> OperandSpec:
    """The spec of ``operand`` (``forward.x`` ... ``grad_weight.grad_out``) on ``rung``."""
    for name, _, weight_activation, gradient in LADDER:
        if name == rung:
            return gradient if operand.endswith("grad_out") else weight_activation
    raise UsageError(f"unknown auto rung {rung!r}; valid: {', '.join(RUNGS)}")


def rung_bits(rung: str) -> float:
    return next(bits for name, bits, _, _ in LADDER if name == rung)


def check_plannable(recipe: Recipe, layers) -> None:
    """Refuse, in one line (`names_pattern`'s), an ``auto`` recipe for a model whose converted
    ``layers`` include a name holding ``|``: `at_plan` names each layer in a pattern, and such a
    name failed only later, in the trainer's memory report or ``lowbit estimate``."""
    if budget_of(recipe) is not None:
        names_pattern(layers)


# The reason of the overrides `at_plan` adds (`lowbit.memory.estimate` notes the plan from it)
PLAN_REASON = "auto plan"


def running_rungs(plan: dict[str, dict[str, str]], idle=frozenset()) -> list[str]:
    """The rungs of the operands of ``plan`` (``{layer: {operand: rung}}``) whose GEMMs run: not
    those in ``idle`` (``(layer, operand)`` pairs, `AutoPrecision.idle`: the input gradient of a
    layer whose input needs none, an expert no token was routed to), which the plan keeps but
    no step computes in."""
    return [
        rung for layer, ops in plan.items() for op, rung in ops.items() if (layer, op) not in idle
    ]


def at_plan(recipe: Recipe, plan: dict[str, dict[str, str]], step: int, idle=frozenset()) -> Recipe:
    """``recipe`` (an ``auto`` one) with each layer's operands on the rungs ``plan`` gives them
    (``{layer: {operand: rung}}``, `AutoPrecision.plan`, as of ``step``): what the run computes
    in, for `lowbit.memory.estimate` (which otherwise sees the bf16 start). The plan's operands
    are those the recipe's overrides leave open, so each layer's become an ``OPERAND:FORMAT``
    override after the recipe's own; layers on the same rungs share one (``a|b|...``). The
    overrides' reason says which plan (``auto plan of step 25: 97 fp4, 29 fp8 of 126
    operands``), counting the operands whose GEMMs ran (not ``idle``, `running_rungs`), as the
    run's summary does: until session 42 it counted every planned one (a one-layer mixture of
    experts whose step routed its 8 tokens to 2 of 16 experts, `docs/memory.md`: "48 fp8, 168
    bf16 of 216 operands", where the run said "48 fp8 of 48 operands")."""
    rungs = running_rungs(plan, idle)
    counts = ", ".join(f"{rungs.count(r)} {r}" for r in RUNGS if r in rungs)
    reason = f"{PLAN_REASON} of step {step}: {counts} of {len(rungs)} operands"
    by_rungs: dict[tuple, list[str]] = {}
    for layer, ops in plan.items():
        if ops:
            by_rungs.setdefault(tuple(sorted(ops.items())), []).append(layer)
    base = recipe.compute_layer
    planned = tuple(
        Override(
            names_pattern(layers),
            base.with_operands({op: operand_spec(rung, op) for op, rung in ops}),
            reason,
            operands=tuple(op for op, _ in ops),
        )
        for ops, layers in by_rungs.items()
    )
    return replace(recipe, overrides=recipe.overrides + planned)


def plan_of(recipe: Recipe) -> str | None:
    """The plan `at_plan` gave ``recipe``, as its overrides' reason says it; None for none."""
    return next((o.reason for o in recipe.overrides if o.reason.startswith(PLAN_REASON)), None)


def plan_layers(recipe: Recipe) -> list[str]:
    """The layer names `at_plan` gave ``recipe`` rungs for (its overrides' ``a|b|...``)."""
    plan = plan_of(recipe)
    return [name for o in recipe.overrides if o.reason == plan for name in pattern_names(o.pattern)]
