import pytest
import torch

from lowbit.errors import UsageError
from lowbit.optim import AdamW, build_optimizer

LOW_PRECISION_STATES = ["bf16", "fp8", "8bit", "4bit"]


@pytest.mark.parametrize("state", LOW_PRECISION_STATES)
@pytest.mark.parametrize("numel", [16, 8192])  # fp32 states (small) and quantized states
def test_complex_parameters_are_refused_where_the_update_would_be_wrong(state, numel):
    real = torch.nn.Parameter(torch.randn(8192))
    complex_param = torch.nn.Parameter(torch.randn(numel, dtype=torch.complex64))
    with pytest.raises(
        UsageError, match=r"parameter 0 of param group 0 has dtype torch.complex64.*fix: "
    ):
        build_optimizer([complex_param], state_precision=state)
    optimizer = build_optimizer([real], state_precision=state)
    with pytest.raises(UsageError, match=r"parameter 0 of param group 1 has dtype torch.complex64"):
        optimizer.add_param_group({"params": [complex_param]})
    assert len(optimizer.param_groups) == 1  # the refused group was not kept


def _stepped_alike(start, steps: int, make, options=None):
    """Two parameters from ``start`` stepped on the same random gradients, one by ``make``'s
    optimizer and one by ``torch.optim.AdamW(**options)``; both parameters, both optimizers."""
    options = {"weight_decay": 0.1} if options is None else options
    mine, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer, reference = make([mine]), torch.optim.AdamW([theirs], **options)
    for _ in range(steps):
        grad = torch.randn_like(start)
        mine.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    return mine, theirs, optimizer, reference


def test_fp32_states_still_update_complex_parameters_as_torch_does():
    torch.manual_seed(0)
    start = torch.randn(16, dtype=torch.complex64)
    mine, theirs, *_ = _stepped_alike(start, 3, lambda p: build_optimizer(p, weight_decay=0.1))
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("state", LOW_PRECISION_STATES)
def test_a_sparse_gradient_is_refused_before_any_parameter_moves(state):
    dense = torch.nn.Parameter(torch.randn(8192))
    embedding = torch.nn.Embedding(128, 64, sparse=True)
    optimizer = build_optimizer(
        [{"params": [dense]}, {"params": embedding.parameters()}], state_precision=state
    )
    before = dense.detach().clone()
    dense.grad = torch.randn_like(dense)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(UsageError, match=r"parameter 0 of param group 1 has a sparse gradient"):
        optimizer.step()
    assert torch.equal(dense, before)
    assert len(optimizer.state) == 0


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.0},
        {"weight_decay": 0.1, "betas": (0.5, 0.9), "eps": 1e-3},
        {"amsgrad": True},
        {"maximize": True},
        {"lr": torch.tensor(0.01)},
        {"foreach": False},
        {"fused": True},
    ],
)
def test_fp32_states_equal_torch_adamw_bit_for_bit(options):
    torch.manual_seed(0)
    start = torch.randn(8, 5)
    mine, theirs, optimizer, reference = _stepped_alike(
        start, 4, lambda p: AdamW(p, **options), options
    )
    assert torch.equal(mine, theirs)
    # and the state dicts load into each other
    again = torch.optim.AdamW([torch.nn.Parameter(start.clone())], **options)
    again.load_state_dict(optimizer.state_dict())
    AdamW([torch.nn.Parameter(start.clone())], **options).load_state_dict(reference.state_dict())


@pytest.mark.parametrize("state", LOW_PRECISION_STATES)
def test_low_bit_states_step_through_zeros_and_wide_ranges_without_nan(state):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8192))
    idle = torch.nn.Parameter(torch.randn(8192))  # no gradient: skipped, no state
    optimizer = build_optimizer([weight, idle], lr=1e-3, state_precision=state)
    spread = torch.logspace(-4, 1, 8192)[torch.randperm(8192)]
    for step in range(12):
        weight.grad = torch.zeros(8192) if step % 4 == 3 else torch.randn(8192) * spread
        optimizer.step()
    exp_avg_sq = optimizer.state[weight]["exp_avg_sq"]
    exp_avg_sq = exp_avg_sq.dequantize() if hasattr(exp_avg_sq, "dequantize") else exp_avg_sq
    assert (exp_avg_sq.float() >= 0).all()
    assert weight.isfinite().all()
    assert idle not in optimizer.state


@pytest.mark.parametrize("state", ["fp32", "bf16", "8bit", "4bit"])
@pytest.mark.parametrize("shape", [(64, 128), (128,)])
def test_a_saved_state_of_another_shape_is_refused_when_loaded(state, shape):
    weight = torch.nn.Parameter(torch.randn(128, 64))
    optimizer = build_optimizer([weight], state_precision=state)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    other = torch.nn.Parameter(torch.randn(*shape))
    loading = build_optimizer([other], state_precision=state)
    with pytest.raises(UsageError, match=r"shape \(128, 64\), but the parameter has shape"):
        loading.load_state_dict(optimizer.state_dict())
    assert len(loading.state) == 0


@pytest.mark.parametrize("state", LOW_PRECISION_STATES)
@pytest.mark.parametrize("numel", [16, 8192])
def test_fp64_parameters_are_not_rounded_to_fp32_by_the_step(state, numel):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(numel, dtype=torch.float64))
    if state != "bf16":  # torchao's update runs in fp32: refused
        with pytest.raises(UsageError, match=r"has dtype torch.float64.*fix: "):
            build_optimizer([weight], state_precision=state)
        return
    before = weight.detach().clone()
    optimizer = build_optimizer([weight], lr=0.0, weight_decay=0.0, state_precision=state)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert torch.equal(weight, before)  # lr 0 leaves an fp64 parameter exactly as it was
