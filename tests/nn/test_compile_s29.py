"""`torch.compile` of an `fp8-delayed` model: one graph, the eager bits, no recompiles.

Before: it broke the graph at every quantized operand, 19 breaks per forward of the 1-layer nano
model: each step's amax was held by assigning a Python attribute inside the layer's autograd
function (``AmaxHistory.pending = ...``), a side effect Dynamo refuses there. Compiled graphs now
write it into a tensor in place, which `commit` takes. And the graph read the history's fill
count, so every commit recompiled it (until Dynamo's recompile limit, then eager): it reads
whether the history has started, which changes once.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaForCausalLM

import lowbit
from lowbit.models.causal_lm import model_config


def nano() -> tuple[torch.nn.Module, lowbit.Precision, torch.optim.Optimizer]:
    """The 1-layer nano decoder (compiling is slow on a CPU) under `fp8-delayed`."""
    config = model_config("nano", 257)
    config.num_hidden_layers = 1
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    precision = lowbit.Precision("fp8-delayed")
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    return model, precision, optimizer


def train(ids: torch.Tensor, compiled: bool, steps: int = 4) -> list[torch.Tensor]:
    """Logits and gradients of each step, then the histories; `precision.step` commits the
    histories between steps, so every step after the first scales with them."""
    model, precision, optimizer = nano()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    seen = []
    for step in range(steps):
        if step == 2:
            graphs = counters["stats"]["unique_graphs"]
        logits = run(ids).logits
        precision.backward(logits.float().square().mean())
        seen += [logits.detach()] + [p.grad.clone() for p in model.parameters()]
        precision.step(optimizer)
        optimizer.zero_grad()
    if compiled:  # compiled for the first step and for the first delayed one, not again
        assert counters["stats"]["unique_graphs"] == graphs
    histories = [
        h.state_dict()
        for layer in model.modules()
        if hasattr(layer, "lowbit_state")
        for h in layer.lowbit_state.histories.values()
    ]
    assert histories and all(h["filled"] == steps for h in histories)
    return seen + [h["history"] for h in histories]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))


def test_a_delayed_scaling_model_compiles_to_one_graph(ids):
    torch._dynamo.reset()
    model, precision, optimizer = nano()
    precision.backward(model(ids).logits.float().square().mean())  # an eager step first
    precision.step(optimizer)  # so that the scales come from the history
    explained = torch._dynamo.explain(lambda x: model(x).logits)(ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_compiled_delayed_scaling_steps_give_the_eager_bits(ids):
    torch._dynamo.reset()
    eager = train(ids, compiled=False)
    compiled = train(ids, compiled=True)
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


FIRST_STEP_COMPILED = """
import sys, torch
from tests.nn.test_compile_s28 import nano, step
ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
model = nano(sys.argv[1])
explained = torch._dynamo.explain(lambda x: model(x).logits)(ids)
assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
compiled = step(torch.compile(nano(sys.argv[1]), backend="aot_eager"), ids)
eager = step(nano(sys.argv[1]), ids)
assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
"""


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-delayed"])
def test_a_model_compiled_before_its_first_eager_step_is_one_graph(recipe):
    """In a fresh process (the kernels not yet loaded, no CPU unit scale made): the model a user
    compiles before training. Before, Dynamo broke the graph at the lock around the kernels' build
    and at the unit scale's first creation, at every quantization: 13 breaks for fp8-tensorwise."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", FIRST_STEP_COMPILED, recipe],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
