"""The ``auto`` guard moves up only the operands its plan may move (session 33)."""

import math

import torch

import lowbit
from lowbit.diagnostics.auto import AutoPrecision
from lowbit.recipes import parse_override
from tests.diagnostics.test_hunt_s21 import _on_two_ranks


def _checked(override: str) -> tuple[torch.nn.Sequential, AutoPrecision]:
    """Three layers under ``auto`` with ``override``, after the first check (fp8 everywhere the
    plan decides)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(3)))
    recipe = lowbit.get_recipe("auto")
    lowbit.convert(model, recipe.with_overrides(parse_override(override, recipe)))
    controller = AutoPrecision(model, "fp8")
    controller.begin()
    model.forward(torch.randn(128, 64, requires_grad=True)).square().mean().backward()
    controller.finish_check(1)
    return model, controller


def _pinned_overflow(rank: int) -> dict:
    """A non-finite step in which the operand an override pinned saturated, on rank 0 only."""
    model, controller = _checked("1=forward.x:fp8_e4m3")
    controller.collector.attach()
    model.forward(torch.randn(128, 64, requires_grad=True)).square().mean().backward()
    stats = controller.collector.collect()
    if rank == 0:
        stats["1"]["forward.x"]["saturated"] = 0.5
    controller.escalate(stats, 2)
    return controller.plan


def test_an_overflow_in_a_pinned_operand_moves_no_other_operand_up():
    """The overflowing operand is an override's, which the guard may not move: it moved every
    operand of every layer up a rung instead (17 here), at each retry."""
    plan = _pinned_overflow(0)
    assert {rung for ops in plan.values() for rung in ops.values()} == {"fp8"}


def test_data_parallel_ranks_agree_when_one_located_the_overflow_in_a_pinned_operand():
    """Rank 0 located the overflow (in the pinned operand), rank 1 nothing: rank 1 alone would
    move every operand up, rank 0 none, and the ranks would train in other formats."""
    plans = _on_two_ranks(_pinned_overflow)
    assert plans[0] == plans[1]
    assert {rung for ops in plans[0].values() for rung in ops.values()} == {"fp8"}


def test_a_pinned_mx_layer_clipping_by_design_does_not_hide_the_layer_that_overflowed():
    """An override's MX layer clips a share of every tensor by design; read as an overflow, it
    hid the layer whose output turned the next layer's input non-finite."""
    model, controller = _checked("0=mxfp6")
    original = model[1].forward
    model[1].forward = lambda x: original(x) * math.inf
    controller.collector.attach()
    model.forward(torch.randn(128, 64, requires_grad=True)).square().mean().backward()
    changes = controller.escalate(controller.collector.collect(), 2)
    assert {c["layer"] for c in changes} == {"1"} and len(changes) == 6
    assert set(controller.plan["2"].values()) == {"fp8"}


def test_a_non_finite_model_input_moves_nothing_up():
    """The first layer read a non-finite input: no rung of any operand causes or cures that."""
    model, controller = _checked("2=forward.x:fp8_e4m3")
    controller.collector.attach()
    x = torch.randn(128, 64)
    x[0, 0] = math.nan
    model.forward(x.requires_grad_()).square().mean().backward()
    assert controller.escalate(controller.collector.collect(), 2) == []
