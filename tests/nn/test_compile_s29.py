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
from tests.once import once_per_session


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


def export_then_eager() -> tuple[torch.Tensor, torch.Tensor]:
    """The exported program's output and the model's eager output, an eager call after the
    export."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16))
    lowbit.convert(model, "fp8-tensorwise")
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x,))
    return program.module()(x).detach(), model(x).detach()


# The traced runs in one fresh process, before any eager step there (the kernels not yet loaded):
# the models a user compiles or exports before training. A compiled `fp8-tensorwise` step first,
# then compiled `fp8-delayed` training, then a `torch.export` of a converted MLP and its eager
# calls, then the eager runs, for their bits; all written to argv[1]. Why fresh: what a process
# makes once (the kernels' load, each cached constant and quantizer) was first made inside a trace
# there, which broke the graph, or kept a fake tensor that failed every later eager call. One
# process serves all three, each traced before any eager step: whatever one makes first, it makes
# inside a trace.
COMPILED_FIRST = """
import sys, torch
from tests.nn.test_compile_s28 import compile_counted, graph_breaks, nano, step
from tests.nn.test_compile_s29 import export_then_eager, train
torch.set_num_threads(1)
ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
model, graphs = compile_counted(nano("fp8-tensorwise"))
tensorwise = [t.detach() for t in step(model, ids)]
tensorwise_graphs = (graphs.frame_count, graph_breaks())
torch._dynamo.reset()
compiled = train(ids, compiled=True)
exported = export_then_eager()
tensorwise_eager = [t.detach() for t in step(nano("fp8-tensorwise"), ids)]
torch.save(
    {
        "compiled": compiled,
        "eager": train(ids, compiled=False),
        "tensorwise": (tensorwise_eager, tensorwise, tensorwise_graphs),
        "exported": exported,
    },
    sys.argv[1],
)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Compiled and eager runs of the fresh process, once for the module's tests (each compile
    traces for seconds on a CPU): the delayed-scaling (eager, compiled) training, each (tensors,
    graphs traced after each step), the tensorwise step's (eager, compiled, (graphs, breaks)), and
    `export_then_eager`'s outputs."""
    saved = once_per_session(
        tmp_path_factory, "s29-compiled-first", lambda: _fresh(tmp_path_factory)
    )
    return saved["eager"], saved["compiled"], saved["tensorwise"], saved["exported"]


def _fresh(tmp_path_factory) -> dict:
    """What `COMPILED_FIRST` saved, run in a fresh process."""
    out = tmp_path_factory.mktemp("s29") / "runs.pt"
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_FIRST, str(out)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out)


def test_a_delayed_scaling_model_compiles_to_one_graph(runs):
    """One whole graph for the first step, and one more for the second, the first whose scales
    come from the history that the first step's commit started. Compiled before any eager step of
    the module's fresh process (after the tensorwise step's trace, which loads the kernels there:
    before, Dynamo broke the graph at the lock around that load and at the unit scale's first
    creation, at every quantization)."""
    _, (_, traced), *_ = runs
    assert traced[:2] == [1, 2]


def test_compiled_delayed_scaling_steps_give_the_eager_bits(runs):
    (eager, _), (compiled, traced), *_ = runs
    assert traced[1:] == [2] * (len(traced) - 1)  # not compiled again after each commit
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


def test_a_model_compiled_before_its_first_eager_step_is_one_graph(runs):
    """In a fresh process (the kernels not yet loaded, no CPU unit scale made): the model a user
    compiles before training. Before, Dynamo broke the graph at the lock around the kernels' build
    and at the unit scale's first creation, at every quantization: 13 breaks for fp8-tensorwise.
    (The module's `runs`: that process's first trace.)"""
    *_, (eager, compiled, graphs), _ = runs
    assert graphs == (1, []), graphs
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


def test_exporting_before_any_eager_call_leaves_eager_calls_working(runs):
    """`unit_scale` kept the fake 1 x 1 tensor it first made inside the trace, and every later
    eager GEMM failed on it ("Cannot access data pointer"). In the module's fresh process: the
    cache is per process."""
    *_, (exported, eager) = runs
    assert torch.equal(exported, eager)
