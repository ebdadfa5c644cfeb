"""`torch.compile` of converted models: one graph, the eager bits.

Before: a model compiled before its first eager step drew each `mxfp4` layer's Hadamard signs in
the trace and cached them in a global (an "unsafe side effect" in the layer's autograd function:
2 breaks per layer, each such function run eagerly; caching nothing, two layers' draws failed to
compile). They are drawn when the layer is converted.

And under a recipe's autocast every attention that `lowbit_sdpa` reroutes (bf16 and fp16 compute
on a CPU) broke the graph at PyTorch's kernel choice (``torch._fused_sdp_choice`` returns an int;
13 breaks for the 1-layer model here), in `mxfp4` and `nvfp4` training too. The choice is now
made while tracing, from the traced operands' shapes, strides and dtypes.
"""

import torch
from transformers import LlamaForCausalLM

import lowbit
import lowbit.nn.linear
from lowbit.models.causal_lm import model_config
from tests.nn.test_compile_s28 import compile_counted, graph_breaks


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    lowbit.convert(model, "mxfp4")
    return model


def mlp_step(model, x) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same stochastic-rounding seeds in both runs
    out = model(x)
    out.square().mean().backward()
    return [out] + [p.grad for p in getattr(model, "_orig_mod", model).parameters()]


def test_an_mxfp4_model_compiled_before_its_first_eager_step_is_one_graph(monkeypatch):
    monkeypatch.setattr(lowbit.nn.linear, "_SIGNS", {})  # as in a new process: no signs drawn yet
    torch._dynamo.reset()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    model, graphs = compile_counted(mlp())
    compiled = mlp_step(model, x)
    assert graphs.frame_count == 1 and not graph_breaks(), (graphs.frame_count, graph_breaks())
    eager = mlp_step(mlp(), x)
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i


def nano(precision: lowbit.Precision) -> torch.nn.Module:
    config = model_config("nano", 257)
    config.num_hidden_layers = 1  # compiling is slow on a CPU
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    precision.convert(model)
    assert model.config._attn_implementation == "lowbit_sdpa"
    return model


def step(model, ids, precision: lowbit.Precision, compiled: bool = False) -> list:
    """The logits and gradients of a step under the recipe's autocast, entered inside what is
    compiled; compiled, also the graph count and breaks."""

    def logits(x):
        with precision.autocast():
            return model(x).logits

    run, graphs = compile_counted(logits) if compiled else (logits, None)
    out = run(ids)
    out.float().square().mean().backward()
    seen = [out] + [p.grad for p in model.parameters()]
    return [*seen, (graphs.frame_count, graph_breaks())] if compiled else seen


def test_rerouted_attention_under_autocast_compiles_to_one_graph_with_the_eager_bits():
    """bf16 autocast, so `lowbit_sdpa` runs the flash backward in fp32; the compiled graph takes
    that path too (the same gradients, bit for bit)."""
    torch._dynamo.reset()
    precision = lowbit.Precision("bf16-mixed")
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    eager = step(nano(precision), ids, precision)
    *compiled, graphs = step(nano(precision), ids, precision, compiled=True)
    assert graphs == (1, []), graphs
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), i
