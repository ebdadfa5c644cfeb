"""An optimizer the loop drops without a replacement (session 33): `Precision` holds wrapped
optimizers weakly, so a dropped one is freed with its master weights, and once the run goes on
without it, it is no part of `state_dict`."""

import copy
import gc
import weakref

import pytest
import torch

from lowbit import Precision
from tests.precision.test_hunt_s25 import step
from tests.precision.test_precision import mlp


def probe(precision):
    """A throwaway linear probe on the inputs, stepped twice and dropped; weak references to
    its optimizer and weight."""
    head = torch.nn.Linear(32, 10).to(precision.param_dtype)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9))
    for seed in range(2):
        step(precision, head, optimizer, seed)
    return weakref.ref(optimizer), weakref.ref(head.weight)


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
def test_a_dropped_probe_optimizer_is_freed_and_a_run_without_it_resumes(recipe):
    """The probe was kept by the precision for the whole run, with its momentum, its weights and
    their fp32 master weights (Kahan buffers); `state_dict` saved its share first, and the run
    resumed with the main optimizer alone was refused: "the saved master weight of parameter 0
    has shape (10, 32), the parameter (64, 32)"."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    enabled = gc.isenabled()
    gc.disable()  # freed as the loop drops it, not when the garbage collector runs
    try:
        dropped_optimizer, dropped_weight = probe(precision)
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        step(precision, model, optimizer, 5)
        assert dropped_optimizer() is None and dropped_weight() is None
    finally:
        if enabled:
            gc.enable()
    saved = copy.deepcopy((precision.state_dict(), model.state_dict(), optimizer.state_dict()))
    assert saved[0]["params_per_optimizer"] == [len(list(model.parameters()))]

    resumed = Precision(recipe)
    again = resumed.convert(mlp())
    again.load_state_dict(saved[1])
    resumed_optimizer = resumed.wrap_optimizer(torch.optim.AdamW(again.parameters(), lr=1e-2))
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[2])
    for seed in (6, 7):
        step(precision, model, optimizer, seed)
        step(resumed, again, resumed_optimizer, seed)
    assert all(map(torch.equal, model.parameters(), again.parameters()))


def test_an_optimizer_dropped_at_the_end_of_the_run_is_still_saved():
    """A precision saved after the function that trained dropped its model and optimizer (no
    step since) keeps their master weights: the run did not go on without them."""

    def train():
        precision = Precision("bf16-low")
        model = precision.convert(mlp())
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        step(precision, model, optimizer, 0)
        return precision

    precision = train()
    gc.collect()
    state = precision.state_dict()
    assert state["params_per_optimizer"] == [6] and len(state["update"]["masters"]) == 6
