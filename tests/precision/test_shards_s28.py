"""What a user's step pre-hook sees under 16-bit parameters (docs/recipes.md, "Optimizer hooks")."""

from __future__ import annotations

import pytest
import torch

from lowbit import Precision


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-sr", "fp16-low"])
def test_a_step_pre_hook_sees_the_unscaled_fp32_gradients_the_step_applies(recipe):
    """Pre-hooks run within the optimizer's step, after unscaling, as under GradScaler: they see
    the fp32 stand-ins with the fp32 gradients the step reads (so a hook that zeroes them stops
    the step), and post-hooks see the model's parameters, written back."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    precision = Precision(recipe)
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    seen = {}

    def pre(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"]]
        seen["pre"] = [(p.dtype, p.grad.dtype) for p in params]
        seen["unscaled"] = [p.grad.clone() for p in params]
        for p in params:
            p.grad.zero_()

    def post(opt, args, kwargs):
        seen["post"] = [p for group in opt.param_groups for p in group["params"]]

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 4).to(model.weight.dtype)
    precision.backward(model(x).float().square().mean())
    unscaled = [t.grad.clone() for t in precision.unscale_(optimizer)]
    precision.step(optimizer)
    assert seen["pre"] == [(torch.float32, torch.float32)] * 2
    assert all(torch.equal(a, b) for a, b in zip(seen["unscaled"], unscaled, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(a is b for a, b in zip(seen["post"], model.parameters(), strict=True))
