"""`Precision` in the loops users write themselves: writes into the weights between steps, hand
clipping, backward options, optimizers that were not wrapped, what `convert` reports."""

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision, convert
from lowbit.errors import UsageError


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def train_step(precision, model, optimizer, seed=1):
    x, y = batch(seed)
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
    precision.backward(loss)
    assert precision.step(optimizer)
    optimizer.zero_grad()


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low"])
def test_weights_loaded_between_steps_are_not_undone_by_the_master_weights(recipe):
    """Restoring other weights mid-run (the best checkpoint, pretrained ones): the next step
    starts from them, not from the fp32 master weights of the old ones."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    train_step(precision, model, optimizer)
    restored = mlp(seed=2).to(precision.param_dtype).state_dict()
    model.load_state_dict(restored)
    optimizer.param_groups[0]["lr"] = 0.0
    train_step(precision, model, optimizer, seed=2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored[name]), name


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low"])
def test_writing_the_same_weights_back_keeps_the_master_weights(recipe):
    """Where the parameter still holds its master's rounding, the master keeps its extra bits:
    loading a model's own state mid-run changes nothing."""

    def run(reload: bool):
        precision = Precision(recipe)
        model = precision.convert(mlp())
        optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        for seed in range(1, 5):
            train_step(precision, model, optimizer, seed)
            if reload:
                model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        return model

    for reloaded, straight in zip(run(True).parameters(), run(False).parameters()):
        assert torch.equal(reloaded, straight)


def test_an_optimizer_that_was_not_wrapped_is_wrapped_at_its_first_step():
    """Unwrapped, its master weights would be missing from the precision state (a resumed run
    would lose them): the step wraps it, and trains as the wrapped one does."""
    models = []
    for wrap in (True, False):
        precision = Precision("bf16-low")
        model = precision.convert(mlp())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        if wrap:
            optimizer = precision.wrap_optimizer(optimizer)
        for seed in (1, 2):
            train_step(precision, model, optimizer, seed)
        assert len(precision.state_dict()["update"]["masters"]) == 4
        models.append(model)
    assert all(map(torch.equal, models[0].parameters(), models[1].parameters()))


def test_an_unwrapped_optimizer_that_holds_states_is_refused():
    """States made outside lowbit (a plain step, a load) are 16-bit: rounded already."""
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    x, y = batch()
    F.cross_entropy(model(x.bfloat16()).float(), y).backward()
    optimizer.step()  # a plain step: bf16 moments
    precision.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
    with pytest.raises(UsageError, match="wrap_optimizer"):
        precision.step(optimizer)
    with pytest.raises(UsageError, match="wrap_optimizer"):
        precision.clip_grad_norm_(optimizer, 1.0)


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_an_unwrapped_optimizer_steps_where_wrapping_holds_no_state(recipe):
    """fp32 parameters have no master weights to lose: the step is plain torch's."""
    reference = mlp()
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with precision.autocast():
        loss = F.cross_entropy(model(x), y)
    precision.backward(loss)
    assert precision.step(optimizer)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-low", "bf16-low"])
def test_unscale_then_torchs_clipping_is_what_the_step_applies(recipe):
    """GradScaler's ``unscale_`` then torch's clipping: the gradients are unscaled (fp32, within
    fp16's precision of fp32's) and the clip reaches the step (for 16-bit parameters the step no
    longer reads their ``.grad``)."""
    x, y = batch()
    reference = mlp()
    F.cross_entropy(reference(x), y).backward()
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
    precision.backward(loss)
    stepped = precision.unscale_(optimizer)
    for tensor, plain in zip(stepped, reference.parameters()):
        assert tensor.grad.dtype == torch.float32
        assert torch.allclose(tensor.grad, plain.grad, rtol=0.05, atol=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_value_(stepped, 0.0)  # a clip the step must apply: no change at all
    assert precision.step(optimizer)
    for weight, old in zip(model.parameters(), before):
        assert torch.equal(weight, old)


def test_backward_takes_retain_graph_and_inputs():
    precision = Precision("fp16-mixed")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batch()
    with precision.autocast():
        loss = F.cross_entropy(model(x).float(), y)
    precision.backward(loss, retain_graph=True, inputs=[model[2].weight])
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    precision.backward(loss)  # the graph was kept
    assert model[0].weight.grad is not None
    assert precision.step(optimizer)


def test_multihead_attention_is_reported_as_one_kept_layer():
    """Its out_proj is no layer of its own: F.multi_head_attention_forward reads its weight."""
    model = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    report = convert(model, "fp8-tensorwise")
    assert set(report.converted) == {"linear1", "linear2"}
    assert list(report.kept) == ["self_attn"]
    assert "out_proj included" in report.kept["self_attn"]
    assert report.summary().startswith("converted 2/3 layers")
