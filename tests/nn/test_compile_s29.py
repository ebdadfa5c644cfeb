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
from transformers import LlamaForCausalLM

import lowbit
from lowbit.models.causal_lm import model_config
from tests.nn.test_compile_s28 import compile_counted, graph_breaks


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


def train(ids: torch.Tensor, compiled: bool, steps: int = 4) -> tuple[list[torch.Tensor], list]:
    """Logits and gradients of each step, then the histories; `precision.step` commits the
    histories between steps, so every step after the first scales with them. And how many graphs
    the compiled model had traced after each step (a graph break anywhere fails)."""
    model, precision, optimizer = nano()
    run, graphs = compile_counted(model) if compiled else (model, None)
    seen, traced = [], []
    for _ in range(steps):
        logits = run(ids).logits
        precision.backward(logits.float().square().mean())
        seen += [logits.detach()] + [p.grad.clone() for p in model.parameters()]
        precision.step(optimizer)
        optimizer.zero_grad()
        traced.append(graphs.frame_count if compiled else 0)
    assert not graph_breaks(), graph_breaks()
    histories = [
        h.state_dict()
        for layer in model.modules()
        if hasattr(layer, "lowbit_state")
        for h in layer.lowbit_state.histories.values()
    ]
    assert histories and all(h["filled"] == steps for h in histories)
    return seen + [h["history"] for h in histories], traced


# The compiled run in a fresh process, before any eager step there (the kernels not yet loaded,
# no CPU unit scale made): the model a user compiles before training. Then the eager run, for its
# bits; both written to argv[1].
COMPILED_FIRST = """
import sys, torch
from tests.nn.test_compile_s29 import train
torch.set_num_threads(1)
ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
compiled = train(ids, compiled=True)
torch.save({"compiled": compiled, "eager": train(ids, compiled=False)}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Compiled and eager training of a fresh process, once for the module's tests (each compile
    traces for seconds on a CPU): (eager, compiled), each (tensors, graphs traced after each
    step)."""
    out = tmp_path_factory.mktemp("s29") / "runs.pt"
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_FIRST, str(out)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    saved = torch.load(out)
    return saved["eager"], saved["compiled"]


def test_a_delayed_scaling_model_compiles_to_one_graph(runs):
    """One whole graph for the first step, and one more for the second, the first whose scales
    come from the history that the first step's commit started. In a fresh process: before, Dynamo
    broke the graph at the lock around the kernels' build and at the unit scale's first creation,
    at every quantization."""
    _, (_, traced) = runs
    assert traced[:2] == [1, 2]


def test_compiled_delayed_scaling_steps_give_the_eager_bits(runs):
    (eager, _), (compiled, traced) = runs
    assert traced[1:] == [2] * (len(traced) - 1)  # not compiled again after each commit
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


FIRST_STEP_COMPILED = """
import sys, torch
from tests.nn.test_compile_s28 import compile_counted, graph_breaks, nano, step
ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
model, graphs = compile_counted(nano(sys.argv[1]))
compiled = step(model, ids)
assert graphs.frame_count == 1 and not graph_breaks(), graph_breaks()
eager = step(nano(sys.argv[1]), ids)
assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
"""


def test_a_model_compiled_before_its_first_eager_step_is_one_graph():
    """In a fresh process (the kernels not yet loaded, no CPU unit scale made): the model a user
    compiles before training. Before, Dynamo broke the graph at the lock around the kernels' build
    and at the unit scale's first creation, at every quantization: 13 breaks for fp8-tensorwise.
    (fp8-delayed's fresh process is the module's `runs`.)"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", FIRST_STEP_COMPILED, "fp8-tensorwise"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
