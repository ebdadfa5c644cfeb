"""`torch.compile` with inductor (its default backend) of a converted model gives eager's bits.

Before: inductor fused a bf16/fp16 op into the op reading its result and skipped the result's
rounding to 16 bits, unless ``torch._inductor.config.emulate_precision_casts`` was set: a compiled
`fp8-tensorwise` ``Linear-GELU-Linear`` under autocast quantized the unrounded GELU output
(outputs up to 0.0156 off eager's), `fp16-low` lost its emulated fp16 roundings. Now a converted
layer, traced, sets the setting and says so in one log line, unless
``TORCHINDUCTOR_EMULATE_PRECISION_CASTS=0``.
"""

import logging

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

import lowbit
from lowbit.nn.attention import AttentionInFp32
from tests.once import once_per_session

ENV = "TORCHINDUCTOR_EMULATE_PRECISION_CASTS"
LINE = "set torch._inductor.config.emulate_precision_casts = True"


def mlp(precision: lowbit.Precision) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    precision.convert(model)
    return model


def step(forward, model, precision: lowbit.Precision, x) -> list[torch.Tensor]:
    with precision.autocast():
        out = forward(x)
    out.float().square().mean().backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


class Lines(logging.Handler):
    """The lines lowbit logs (``caplog`` is a test's, not a module fixture's)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module", params=["fp8-tensorwise"])  # fp16-low: the same setting
def compiled(request, tmp_path_factory):
    """Eager's and inductor's output and gradients of one step of the MLP, compiled from the
    default setting (False), and the lines lowbit logged; the setting restored afterwards (by
    torch's ``config.patch``: a monkeypatch of the config module deletes the setting when undone).
    Once per session."""
    name = f"compile-casts-s39-{request.param}"
    return once_per_session(tmp_path_factory, name, lambda: _compiled(request.param))


def _compiled(recipe: str):
    precision = lowbit.Precision(recipe)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    model = mlp(precision)
    eager = step(model, model, precision, x)
    logger, lines = logging.getLogger("lowbit"), Lines()
    with (
        pytest.MonkeyPatch.context() as patch,
        inductor_config.patch(emulate_precision_casts=False),
    ):
        patch.delenv(ENV, raising=False)
        torch._dynamo.reset()
        logger.addHandler(lines)
        try:
            model = mlp(precision)
            bits = step(torch.compile(model), model, precision, x)
            setting = inductor_config.emulate_precision_casts
        finally:
            logger.removeHandler(lines)
    return eager, bits, lines.lines, setting


@pytest.mark.slow  # inductor compiles C++: 4-15 s, cache warm; 33-71 s cold (2 busy cores)
def test_inductor_gives_the_eager_output_and_gradients(compiled):
    eager, bits, _, _ = compiled
    for i, (a, b) in enumerate(zip(eager, bits, strict=True)):
        assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max().item())


@pytest.mark.slow
def test_lowbit_says_in_one_line_that_it_set_the_setting(compiled):
    _, _, lines, setting = compiled
    assert setting is True
    assert len([line for line in lines if LINE in line]) == 1, lines
    assert ENV + "=0" in lines[0] and "\n" not in lines[0]


def traced_setting(fn, *args) -> bool:
    """The setting after ``fn`` is traced, starting from False: Dynamo's trace sets it, before
    any backend runs (``eager``, the fastest, here)."""
    with inductor_config.patch(emulate_precision_casts=False):
        torch._dynamo.reset()
        torch.compile(fn, backend="eager")(*args)
        return inductor_config.emulate_precision_casts


def test_a_traced_layer_sets_the_setting_unless_the_environment_says_0(monkeypatch):
    layer = lowbit.Precision("fp16-low").convert(torch.nn.Linear(16, 16))
    x = torch.randn(4, 16)
    monkeypatch.delenv(ENV, raising=False)
    assert traced_setting(layer, x) is True
    monkeypatch.setenv(ENV, "0")
    assert traced_setting(layer, x) is False


def test_traced_fp32_attention_sets_the_setting(monkeypatch):
    """Attention rerouted in fp32 (`AttentionInFp32`, fp16 and bf16 compute on a CPU) rounds its
    output to 16 bits, which the next op may read fused."""
    monkeypatch.delenv(ENV, raising=False)
    q, k, v = torch.randn(3, 1, 2, 8, 16).to(torch.float16)

    def attention(q, k, v):
        with AttentionInFp32():
            return F.scaled_dot_product_attention(q, k, v)

    assert traced_setting(attention, q, k, v) is True
