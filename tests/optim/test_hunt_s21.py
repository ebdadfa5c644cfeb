import io

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.optim import STATE_PRECISIONS, build_optimizer


def _saved(state_precision, steps=1):
    """A 8192-value parameter (quantized states) and a 7-value one (fp32 states), stepped, and
    the optimizer's state_dict as torch.save/torch.load hand it back."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in (8192, 7)]
    optimizer = build_optimizer(params, lr=1e-2, weight_decay=0.1, state_precision=state_precision)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return params, torch.load(buffer, weights_only=False)


def _continue(params, state_precision, state_dict, steps=2):
    """The parameters after ``steps`` more steps of a fresh optimizer loaded with ``state_dict``."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = build_optimizer(params, lr=1e-2, weight_decay=0.1, state_precision=state_precision)
    optimizer.load_state_dict(state_dict)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("state", STATE_PRECISIONS)
def test_a_loaded_state_dict_is_not_changed_by_the_steps_that_follow(state):
    # The load used to alias the saved step counters (and torchao's quantized moments): stepping
    # the loaded optimizer advanced them in the caller's dict, so a second load of the same dict
    # (a second continuation from one checkpoint) resumed at the wrong step with other moments.
    params, state_dict = _saved(state)
    first = _continue(params, state, state_dict)
    assert all(entry["step"].item() == 1 for entry in state_dict["state"].values())
    second = _continue(params, state, state_dict)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


MISMATCHED = [
    ("fp32", "8bit"),
    ("8bit", "fp32"),
    ("fp32", "bf16"),
    ("4bit", "bf16"),
    ("fp8", "8bit"),
]


@pytest.mark.parametrize("saved, loading", MISMATCHED)
def test_a_state_dict_of_another_state_precision_is_refused_in_one_line(saved, loading):
    # It used to load: an 8bit optimizer then stepped fp32 moments (4x the memory it reports
    # by name), bf16 states stepped torchao's 4-bit ones, and fp32 Adam failed in its first step
    # with torchao's "unimplemented operator aten.lerp_" traceback (`lowbit doctor --checkpoint
    # RUN --optimizer-state fp32` on an 8bit run).
    params, state_dict = _saved(saved)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = build_optimizer(fresh, lr=1e-2, state_precision=loading)
    with pytest.raises(UsageError, match=f"has {saved} moments.*--optimizer-state") as error:
        optimizer.load_state_dict(state_dict)
    assert "\n" not in str(error.value)
    assert not optimizer.state  # refused before anything was loaded: it starts fresh
    for p in fresh:
        p.grad = torch.ones_like(p)
    optimizer.step()


def test_fp32_adam_still_loads_the_states_of_a_bf16_parameter_it_made():
    # torch.optim.AdamW keeps a bf16 parameter's moments in bf16 outside lowbit.Precision
    w = torch.nn.Parameter(torch.randn(8192).bfloat16())
    optimizer = build_optimizer([w], lr=1e-2, state_precision="fp32")
    w.grad = torch.randn_like(w)
    optimizer.step()
    again = build_optimizer([w], lr=1e-2, state_precision="fp32")
    again.load_state_dict(optimizer.state_dict())
    assert again.state[w]["exp_avg"].dtype == torch.bfloat16
