import io

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.memory import measure, tensor_bytes
from lowbit.memory.measure import optimizer_state_tensors
from lowbit.optim import (
    STATE_PRECISIONS,
    build_optimizer,
    keeps_fp32_states,
    state_bytes_per_param,
    state_tensor_bytes,
)


def _state_bytes(optimizer, param) -> int:
    state = optimizer.state[param]
    return tensor_bytes([state["exp_avg"], state["exp_avg_sq"]])


@pytest.mark.parametrize(
    "precision, expected",
    [("fp32", 8.0), ("bf16", 4.0), ("fp8", 2.0), ("8bit", 2.0), ("4bit", 1.0)],
)
def test_state_bytes_per_param_on_a_large_tensor(precision, expected):
    weight = torch.nn.Parameter(torch.randn(512, 1024))
    optimizer = build_optimizer([weight], lr=1e-3, state_precision=precision)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    measured = _state_bytes(optimizer, weight)
    assert measured == 2 * state_tensor_bytes(precision, weight.numel())
    per_param = measured / weight.numel()
    assert per_param == pytest.approx(state_bytes_per_param(precision, weight.numel()))
    # block scales (fp32 per 256 or 128 values) and code maps come on top of the codes
    assert expected <= per_param <= expected * 1.07


@pytest.mark.parametrize("precision", STATE_PRECISIONS)
def test_small_tensors_keep_fp32_states(precision):
    small = torch.nn.Parameter(torch.randn(4095))  # one value under the 4096 threshold
    large = torch.nn.Parameter(torch.randn(16, 256))  # exactly 4096
    optimizer = build_optimizer([small, large], lr=1e-3, state_precision=precision)
    for p in (small, large):
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert _state_bytes(optimizer, small) == 2 * 4 * small.numel()
    expected_large = 2 * state_tensor_bytes(precision, large.numel())
    assert _state_bytes(optimizer, large) == expected_large
    assert keeps_fp32_states(precision, 4095)
    assert keeps_fp32_states(precision, 4096) == (precision == "fp32")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 128)  # 8192 weights: quantized states; bias: fp32 states
        self.b = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _run(model, precision, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=generator).to(model.a.weight.dtype)
        with precision.autocast():
            loss = model(x).float().square().mean()
        precision.backward(loss)
        precision.clip_grad_norm_(optimizer, 1.0)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)


def _fresh(recipe, state):
    model = _Net()
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1, state_precision=state)
    )
    return model, precision, optimizer


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
@pytest.mark.parametrize("state", STATE_PRECISIONS)
def test_checkpoint_resume_is_bit_identical(recipe, state):
    model, precision, optimizer = _fresh(recipe, state)
    _run(model, precision, optimizer, 2, seed=1)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "precision": precision.state_dict(),
        },
        buffer,
    )
    before = measure(model, optimizer, precision)
    _run(model, precision, optimizer, 3, seed=2)
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, precision2, optimizer2 = _fresh(recipe, state)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    precision2.load_state_dict(saved["precision"])
    # the loaded states have the saved dtypes and sizes (not cast to a bf16 parameter's dtype)
    after = measure(model2, optimizer2, precision2)
    assert after.optimizer_states == before.optimizer_states
    _run(model2, precision2, optimizer2, 3, seed=2)
    for p, q in zip(model2.parameters(), expected, strict=True):
        assert torch.equal(p, q)


def test_bf16_states_with_stochastic_rounding_track_fp32_where_nearest_stalls():
    # A constant gradient: v_t -> g**2 by increments of (1 - beta2)(g**2 - v), which fall below
    # half of bf16's spacing near g**2; round-to-nearest then stalls, stochastic rounding does not.
    g = torch.full((8192,), 0.5)
    params = {k: torch.nn.Parameter(torch.zeros(8192)) for k in ("fp32", "bf16")}
    optimizers = {
        k: build_optimizer([p], lr=1e-6, betas=(0.9, 0.999), state_precision=k)
        for k, p in params.items()
    }
    nearest = torch.zeros(8192, dtype=torch.bfloat16)
    for _ in range(1500):
        for k, p in params.items():
            p.grad = g.clone()
            optimizers[k].step()
        nearest = nearest.float().lerp(g.square(), 1e-3).to(torch.bfloat16)
    reference = optimizers["fp32"].state[params["fp32"]]["exp_avg_sq"].mean().item()
    sr = optimizers["bf16"].state[params["bf16"]]["exp_avg_sq"]
    assert sr.dtype == torch.bfloat16
    assert abs(sr.float().mean().item() / reference - 1) < 0.005
    assert abs(nearest.float().mean().item() / reference - 1) > 0.02


# Relative distance of the loss after 100 steps from fp32 states' (4-bit is the lossiest).
TOLERANCE = {"fp32": 0, "bf16": 0.02, "fp8": 0.15, "8bit": 0.05, "4bit": 0.35}


def test_low_bit_states_follow_fp32_adam_closely():
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    finals = {}
    for state in STATE_PRECISIONS:
        w = torch.nn.Parameter(torch.zeros(64, 128))
        optimizer = build_optimizer([w], lr=1e-2, state_precision=state)
        for _ in range(100):
            loss = (w - target).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        finals[state] = (w - target).square().mean().item()
    initial = target.square().mean().item()
    for state, loss in finals.items():
        assert loss < 0.5 * initial, state
        assert loss == pytest.approx(finals["fp32"], rel=TOLERANCE[state]), state


def test_float_learning_rate_from_a_scheduler_is_accepted():
    w = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = build_optimizer([w], lr=1e-2, state_precision="8bit")
    optimizer.param_groups[0]["lr"] = 0.0  # what the trainer's set_lr writes
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    optimizer.step()
    assert torch.equal(w, before)  # lr 0 and no weight decay: no change
    assert len(optimizer_state_tensors(optimizer)) == 3


def test_unknown_names_are_usage_errors():
    w = [torch.nn.Parameter(torch.zeros(2))]
    fix = 'fix: state_precision="fp32"'
    with pytest.raises(UsageError, match=f"precisions: fp32, bf16, fp8, 8bit, 4bit; {fix}"):
        build_optimizer(w, state_precision="int3")
    with pytest.raises(UsageError, match='valid optimizers: adamw, adam; fix: name="adamw"'):
        build_optimizer(w, name="lion")


@pytest.mark.parametrize("state", ["fp32", "bf16"])  # torchao's states: docs/memory.md
@pytest.mark.parametrize("huge", [1e20, 1e30])
def test_a_gradient_whose_square_overflows_leaves_the_parameters_finite(state, huge):
    # g**2 is inf in fp32: PyTorch's update of that coordinate is 0; bf16 states used to store a
    # saturated v under a huge m, and the next step moved the parameter by ~1e7
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128))
    start = w.detach().clone()
    optimizer = build_optimizer([w], lr=1e-2, state_precision=state)
    for step in range(4):
        w.grad = torch.randn(64, 128)
        if step == 1:
            w.grad[0, 0] = huge
        optimizer.step()
    assert torch.isfinite(w).all()
    assert (w - start).abs().max() < 0.1  # Adam moves a parameter by ~lr a step


BAD_HYPERPARAMETERS = [
    dict(lr=-1e-3),
    dict(lr=float("nan")),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, -0.1)),
    dict(betas=(0.9,)),
    dict(eps=-1e-8),
    dict(weight_decay=-0.1),
]


@pytest.mark.parametrize("state", STATE_PRECISIONS)
@pytest.mark.parametrize("bad", BAD_HYPERPARAMETERS, ids=str)
def test_bad_hyperparameters_are_refused_in_one_line(state, bad):
    w = [torch.nn.Parameter(torch.zeros(8192))]
    with pytest.raises(UsageError, match=next(iter(bad))) as error:
        build_optimizer(w, state_precision=state, **bad)
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match=next(iter(bad))):  # in a param group as well
        build_optimizer([{"params": w, **bad}], state_precision=state)


@pytest.mark.parametrize("state", STATE_PRECISIONS)
@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
def test_options_a_state_precision_cannot_honour_are_refused_not_ignored(state, option):
    w = torch.nn.Parameter(torch.zeros(8192))
    if state != "fp32":
        with pytest.raises(UsageError, match=option):
            build_optimizer([{"params": [w], option: True}], state_precision=state)
        return
    optimizer = build_optimizer([{"params": [w], option: True}], lr=1e-3, state_precision=state)
    w.grad = torch.ones(8192)
    optimizer.step()
    assert (w > 0).all() == (option == "maximize")  # torch.optim.AdamW honours both


def _bf16_states_on_a_shard(rank, world_size):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    w = torch.nn.Parameter(distribute_tensor(torch.zeros(32, 256), mesh, [Shard(0)]))
    optimizer = build_optimizer([w], lr=1e-3, state_precision="bf16")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        w.grad = distribute_tensor(torch.randn(32, 256, generator=generator), mesh, [Shard(0)])
        optimizer.step()
    return w.full_tensor(), optimizer.state[w]["exp_avg"].to_local().dtype


def test_bf16_states_step_a_sharded_parameter():
    # FSDP2 hands the optimizer DTensors; the stochastic rounding of the states used to fail there
    from tests.distributed.helpers import on_ranks

    w = torch.nn.Parameter(torch.zeros(32, 256))
    optimizer = build_optimizer([w], lr=1e-3, state_precision="bf16")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        w.grad = torch.randn(32, 256, generator=generator)
        optimizer.step()
    for sharded, dtype in on_ranks(_bf16_states_on_a_shard, nproc=2):
        assert dtype == torch.bfloat16
        torch.testing.assert_close(sharded, w.detach(), rtol=0, atol=1e-4)  # SR noise
