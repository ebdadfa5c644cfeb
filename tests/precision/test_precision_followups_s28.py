"""Session 28: a save right after a load, `clip_grad_norm_` as torch's, frozen 16-bit bases."""

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    )


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)


def _trained(recipe):
    """A precision state after two steps of two optimizers (the first layer's and the rest's)."""
    precision = Precision(recipe)
    model = precision.convert(_model())
    first = precision.wrap_optimizer(torch.optim.AdamW(model[0].parameters(), lr=1e-2))
    rest = precision.wrap_optimizer(torch.optim.AdamW(model[2:].parameters(), lr=1e-2))
    x, y = _batch()
    for _ in range(2):
        with precision.autocast():
            loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
        precision.backward(loss)
        precision.step(first, rest)
        first.zero_grad()
        rest.zero_grad()
    return precision.state_dict()


def _assert_same(saved, again, where="state"):
    assert type(saved) is type(again), where
    if isinstance(saved, dict):
        assert saved.keys() == again.keys(), where
        for key in saved:
            _assert_same(saved[key], again[key], f"{where}[{key!r}]")
    elif torch.is_tensor(saved):
        assert torch.equal(saved, again), where
    else:
        assert saved == again, where


@pytest.mark.parametrize(
    "recipe", ["bf16-low", "bf16-pure-kahan", "bf16-pure-sr", "fp8-delayed", "mxfp4"]
)
def test_a_save_right_after_a_load_keeps_everything_loaded(recipe):
    """`state_dict` between `load_state_dict` and the re-wrapping of the optimizers (a checkpoint
    converted, a resumed run saved before its first step) left out the master weights or Kahan
    buffers no optimizer had taken yet, and the layers' amax histories of a model not converted
    yet, and saved torch's generators as they were by then, not as loaded: a run resumed from
    that save continued from the rounded weights, and drew other random numbers."""
    saved = _trained(recipe)
    assert any(saved["update"].values()) or saved["layers"] or "rng" in saved

    alone = Precision(recipe)  # nothing converted or wrapped
    alone.load_state_dict(saved)
    _assert_same(saved, alone.state_dict())

    partly = Precision(recipe)  # the model and the first optimizer only
    partly.load_state_dict(saved)
    model = partly.convert(_model())
    partly.wrap_optimizer(torch.optim.AdamW(model[0].parameters(), lr=1e-2))
    again = partly.state_dict()
    if not any(saved["update"].values()):  # no state per parameter, whose sizes would matter
        assert again.pop("params_per_optimizer") == saved.pop("params_per_optimizer")[:1]
    _assert_same(saved, again)


def test_a_save_after_a_load_keeps_entries_of_param_groups_still_to_be_added():
    """An optimizer wrapped again with fewer parameters than it was saved with (its later param
    groups are added before the next step) keeps the saved entries past its own."""
    saved = _trained("bf16-low")
    precision = Precision("bf16-low")
    precision.load_state_dict(saved)
    model = precision.convert(_model())
    precision.wrap_optimizer(torch.optim.AdamW(model[0].parameters(), lr=1e-2))
    rest = precision.wrap_optimizer(torch.optim.AdamW(model[2].parameters(), lr=1e-2))
    _assert_same(saved, precision.state_dict())
    rest.add_param_group({"params": list(model[3].parameters())})
    _assert_same(saved, precision.state_dict())


def test_a_save_after_a_load_of_a_state_without_optimizer_sizes_keeps_its_entries():
    """A state saved before per-optimizer sizes were recorded saves again as it was loaded."""
    saved = _trained("bf16-low")
    del saved["params_per_optimizer"]
    precision = Precision("bf16-low")
    precision.load_state_dict(saved)
    again = precision.state_dict()
    assert again.pop("params_per_optimizer") is None
    _assert_same(saved, again)


def _grads_of_a_step(recipe, model_dtype=torch.float32):
    precision = Precision(recipe)
    model = precision.convert(_model().to(model_dtype))
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch()
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
    precision.backward(loss)
    return precision, model, optimizer


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.05, None, 1e9])
def test_clip_grad_norm_under_fp32_is_bit_identical_to_torch(norm_type, max_norm):
    """`clip_grad_norm_` returned a float and took no ``norm_type``; it returns torch's tensor,
    bit for bit, and clips the gradients as torch's does."""
    precision, model, optimizer = _grads_of_a_step("fp32")
    reference = _model()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(
        reference.parameters(), max_norm if max_norm is not None else float("inf"), norm_type
    )
    total = precision.clip_grad_norm_(optimizer, max_norm, norm_type=norm_type)
    assert torch.is_tensor(total) and total.dtype == expected.dtype
    assert torch.equal(total, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_clip_grad_norm_is_the_norm_of_the_unscaled_fp32_gradients():
    """Under fp16 loss scaling and 16-bit parameters with master weights the norm is that of the
    fp32 gradients the step applies, unscaled; ``error_if_nonfinite`` raises as torch's does."""
    precision, model, optimizer = _grads_of_a_step("fp16-low", torch.float16)
    scale = precision.loss_scale
    expected = torch.linalg.vector_norm(
        torch.cat([(p.grad.float() / scale).flatten() for p in model.parameters()]), 3.0
    )
    total = precision.clip_grad_norm_(optimizer, None, 3.0)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    assert total.dtype == torch.float32

    precision, model, optimizer = _grads_of_a_step("fp32")
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        precision.clip_grad_norm_(optimizer, 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_with_no_gradients_is_a_zero_tensor():
    precision = Precision("fp32")
    optimizer = precision.wrap_optimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    assert torch.equal(precision.clip_grad_norm_(optimizer, 1.0), torch.tensor(0.0))


class _Adapted(torch.nn.Module):
    """A frozen base linear layer with a trainable low-rank adapter beside it (LoRA's shape)."""

    def __init__(self, width, rank=4):
        super().__init__()
        self.base = torch.nn.Linear(width, width)
        self.down = torch.nn.Linear(width, rank, bias=False)
        self.up = torch.nn.Linear(rank, width, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class _AdaptedLM(torch.nn.Module):
    def __init__(self, vocab=50, width=64, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(width), _Adapted(width), torch.nn.GELU())
            for _ in range(2)
        )
        self.head = torch.nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _adapted_bf16(tied=False):
    """A bf16 model whose adapters alone train (adapters made in the base's dtype, as
    ``peft``'s ``autocast_adapter_dtype=False`` or a hand-made LoRA leaves them)."""
    torch.manual_seed(0)
    model = _AdaptedLM(tied=tied).to(torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_(".down." in name or ".up." in name)
    return model


def _adapter_run(recipe, model):
    precision = Precision(recipe)
    model = precision.convert(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(trained, lr=1e-2))
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        with precision.autocast():
            loss = F.cross_entropy(model(ids).float().flatten(0, 1), ids.flatten())
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses, trained


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp8-tensorwise", "mxfp8"])
def test_a_frozen_bf16_base_keeps_its_linear_weights_in_bf16_under_autocast(recipe):
    """`convert` cast a bf16 model with bf16 adapters up to fp32 wholesale, its frozen base too,
    doubling the base's memory. Under an autocast recipe the frozen weights of linear layers stay
    bf16 (autocast rounds them to bf16 for each GEMM either way), and training computes what the
    wholesale cast computes: the same losses and adapters, bit for bit (tolerance: none)."""
    model, losses, trained = _adapter_run(recipe, _adapted_bf16())
    cast, cast_losses, cast_trained = _adapter_run(recipe, _adapted_bf16().float())
    assert losses == cast_losses
    assert all(torch.equal(a, b) for a, b in zip(trained, cast_trained, strict=True))
    assert all(p.dtype == torch.float32 for p in trained)  # the adapters train in fp32
    assert model.blocks[0][1].base.weight.dtype == model.head.weight.dtype == torch.bfloat16
    # norms and embeddings, which compute in their own weights' dtype, are cast up
    assert model.embed.weight.dtype == model.blocks[0][0].weight.dtype == torch.float32

    def frozen_bytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)

    assert frozen_bytes(model) < 0.65 * frozen_bytes(cast)


def test_a_frozen_16_bit_base_is_cast_up_without_autocast_or_where_shared():
    """Without autocast (the fp32 recipe) an fp32 input meets the frozen weights in plain
    ``F.linear``, which refuses a bf16 weight: the model is cast up wholesale, as before. A weight
    an embedding shares with a linear head (tied) is cast up too."""
    model, _, _ = _adapter_run("fp32", _adapted_bf16())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _, _ = _adapter_run("bf16-mixed", _adapted_bf16(tied=True))
    assert model.head.weight is model.embed.weight
    assert model.head.weight.dtype == torch.float32
    assert model.blocks[0][1].base.weight.dtype == torch.bfloat16
