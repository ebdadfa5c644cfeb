"""Swapping `nn.Linear` / `nn.Conv2d` for their low-precision versions, in place.

A post-order walk over the module tree: each Linear/Conv2d whose fully qualified name the recipe
assigns a layer spec is replaced by a `LowbitLinear`/`LowbitConv2d` that holds the *same* Parameter
objects (optimizers and tied weights keep working). Every other Linear/Conv2d is kept, with the
reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.nn.conv import LowbitConv2d, conv_unsupported_reason
from lowbit.nn.linear import LowbitLinear, LowbitModule
from lowbit.recipes import Recipe, get_recipe
from lowbit.recipes.recipe import RECIPE_DEFAULT


@dataclass
class ConversionReport:
    converted: dict[str, str] = field(default_factory=dict)  # name -> spec description
    kept: dict[str, str] = field(default_factory=dict)  # name -> reason

    def summary(self) -> str:
        total = len(self.converted) + len(self.kept)
        lines = [f"converted {len(self.converted)}/{total} layers"]
        reasons: dict[str, list[str]] = {}
        for name, reason in self.kept.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
            lines.append(f"  kept {len(names)}: {reason}: {shown}")
        return "\n".join(lines)


def convert(
    model: torch.nn.Module, recipe: Recipe | str, report: ConversionReport | None = None
) -> ConversionReport:
    """Swap the model's Linear/Conv2d layers for low-precision ones as ``recipe`` says."""
    recipe = get_recipe(recipe).resolved_for(name for name, _ in model.named_modules())
    report = report if report is not None else ConversionReport()

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            visit(child, name)
            if type(child) not in (torch.nn.Linear, torch.nn.Conv2d):
                continue
            spec, reason = recipe.layer_for(name)
            if spec is None:
                report.kept[name] = reason
                continue
            if isinstance(child, torch.nn.Conv2d):
                unsupported = conv_unsupported_reason(child)
                if unsupported:
                    report.kept[name] = unsupported
                    continue
                replacement = LowbitConv2d(child, spec)
            else:
                replacement = LowbitLinear(child, spec)
            # A layer an override gave its spec keeps it: the auto controller moves the others.
            replacement.lowbit_state.overridden = reason != RECIPE_DEFAULT
            setattr(module, child_name, replacement)
            report.converted[name] = spec.describe()

    visit(model, "")
    return report


def lowbit_layers(model: torch.nn.Module) -> dict[str, LowbitModule]:
    """Every converted layer by fully qualified name."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, LowbitModule)
    }
