"""Low-precision optimizer states that quantize no tensor are named at the first step (session 37).

Every tensor of a small model (the image-classification CNN) has under 4096 values and keeps
fp32 states, so ``--optimizer-state 4bit`` kept 8 bytes per parameter without a word."""

import pytest
import torch

from lowbit.optim import build_optimizer


def _first_step(state_precision: str, *shapes) -> None:
    params = [torch.nn.Parameter(torch.ones(shape)) for shape in shapes]
    optimizer = build_optimizer(params, state_precision=state_precision)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    optimizer.step()


@pytest.mark.parametrize(
    "state_precision, shapes",
    [("bf16", [(16, 8), (16,)]), ("8bit", [(16, 8), (16,), (64, 65)])],  # 4160: not whole blocks
)
def test_states_that_quantize_nothing_are_named_once(state_precision, shapes, capsys):
    _first_step(state_precision, (16,), (64, 64))  # the matrix's states are quantized: no word
    assert "save no memory" not in capsys.readouterr().err
    _first_step(state_precision, *shapes)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1, warnings
    assert f"{state_precision} optimizer states save no memory here" in warnings[0]
    assert "--optimizer-state fp32" in warnings[0]
