"""16-bit attention on CPU (lowbit.nn.attention): bf16 runs PyTorch's bf16 forward and its
backward in fp32; fp16 runs both in fp32 on the fp16 values, outputs and gradients in fp16."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision
from lowbit.formats.error import sqnr
from lowbit.models import build_causal_lm
from lowbit.nn.attention import AttentionInFp32


def qkv(dtype, seed=0, shape=(2, 3, 40, 16)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def native(q, k, v, dtype=torch.bfloat16, **kwargs):
    """Plain PyTorch on the operands rounded to bf16 (what bf16 autocast calls)."""
    return F.scaled_dot_product_attention(*(t.to(dtype) for t in (q, k, v)), **kwargs)


def fp32_reference(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), **kwargs)


def grads(out, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen).to(out.dtype)
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("dtype", "floor_db"), [(torch.bfloat16, 40), (torch.float16, 55)])
def test_forward_bits_and_fp32_accurate_gradients(dtype, floor_db, causal):
    """bf16: the forward is PyTorch's bf16 kernel; fp16: the fp32 kernel on the fp16 values,
    rounded to fp16. Gradients: those of the fp32 computation on the same 16-bit inputs, rounded
    once (bf16: > 40 dB; fp16, 3 more mantissa bits: > 55 dB), at least as close to them as the
    16-bit kernel's own gradients."""
    q, k, v = qkv(dtype)
    with AttentionInFp32():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    kernel_16_bit = native(q, k, v, dtype=dtype, is_causal=causal)
    fp32 = fp32_reference(q, k, v, is_causal=causal)
    assert out.dtype == dtype
    assert torch.equal(out, kernel_16_bit if dtype == torch.bfloat16 else fp32.to(dtype))
    for ours, kernel_grad, exact in zip(
        grads(out, (q, k, v)), grads(kernel_16_bit, (q, k, v)), grads(fp32, (q, k, v))
    ):
        assert ours.dtype == dtype
        assert sqnr(exact.float(), ours.float()) > floor_db
        assert sqnr(exact.float(), ours.float()) >= sqnr(exact.float(), kernel_grad.float()) - 1


def saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_it_saves_what_the_16_bit_kernel_saves(dtype):
    q, k, v = qkv(dtype)

    def rerouted():
        with AttentionInFp32():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def kernel_16_bit():
        F.scaled_dot_product_attention(q, k, v, is_causal=True)

    assert saved_bytes(rerouted) == saved_bytes(kernel_16_bit) > 0


def test_under_bf16_autocast_fp32_inputs_are_rounded_first():
    q, k, v = qkv(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), AttentionInFp32():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, native(q, k, v, is_causal=True))
    (gq,) = grads(out, (q,))
    assert gq.dtype == torch.float32  # the gradient returns in the input's dtype, as autocast's


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("mask_shape", [(40, 40), (2, 1, 40, 40)])
def test_a_float_mask_is_rounded_like_the_operands(positional, mask_shape):
    q, k, v = qkv(torch.bfloat16)
    mask = torch.randn(mask_shape)
    with AttentionInFp32():
        if positional:
            out = F.scaled_dot_product_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, native(q, k, v, attn_mask=mask.to(torch.bfloat16)))
    fp32 = fp32_reference(q, k, v, attn_mask=mask.to(torch.bfloat16).float())
    for ours, exact in zip(grads(out, (q, k, v)), grads(fp32, (q, k, v))):
        assert sqnr(exact.float(), ours.float()) > 40


@pytest.mark.parametrize(
    "options",
    [
        {"attn_mask": torch.ones(40, 40, dtype=torch.bool).tril()},
        {"is_causal": True, "enable_gqa": True},
        {"dropout_p": 0.5},
    ],
    ids=["bool mask", "grouped-query", "dropout"],
)
def test_calls_the_flash_kernel_does_not_take_are_left_to_pytorch(options):
    q, _, _ = qkv(torch.bfloat16)
    kv_heads = 1 if options.get("enable_gqa") else 3
    k, v, _ = qkv(torch.bfloat16, seed=2, shape=(2, kv_heads, 40, 16))
    torch.manual_seed(0)  # the same dropout draws for both
    with AttentionInFp32():
        out = F.scaled_dot_product_attention(q, k, v, **options)
    torch.manual_seed(0)
    assert torch.equal(out, native(q, k, v, **options))
    assert all(g.dtype == torch.bfloat16 for g in grads(out, (q, k, v)))


def test_fp32_passes_through_untouched():
    q, k, v = qkv(torch.float32)
    with AttentionInFp32():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def tiny_lm_grads(recipe: str, wrap: bool):
    """Loss and q_proj weight gradient of one step of the tiny Llama under ``recipe``;
    ``wrap``: the converted model's attention switched back to plain ``sdpa``, its forward inside
    `AttentionInFp32` instead."""
    precision = Precision(recipe)
    model = precision.convert(build_causal_lm("tiny", 257, seed=0))
    if wrap:
        model.set_attn_implementation("sdpa")
    tokens = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(0))
    mode = AttentionInFp32() if wrap else contextlib.nullcontext()
    with precision.autocast(), mode:
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-mixed", "fp16-low"])
def test_convert_routes_a_transformers_models_attention(recipe):
    routed_loss, routed_grad = tiny_lm_grads(recipe, wrap=False)
    wrapped_loss, wrapped_grad = tiny_lm_grads(recipe, wrap=True)
    assert torch.equal(routed_loss, wrapped_loss)
    assert torch.equal(routed_grad, wrapped_grad)


def test_routing_is_for_16_bit_compute_on_cpu_and_not_saved(tmp_path):
    for recipe in ("fp32", "fp16-mixed"):  # fp16-mixed computes between its GEMMs in fp32
        model = Precision(recipe).convert(build_causal_lm("tiny", 257))
        assert model.config._attn_implementation == "sdpa"
    fp16 = Precision("fp16-low").convert(build_causal_lm("tiny", 257))
    assert fp16.config._attn_implementation == "lowbit_sdpa"
    bf16 = Precision("bf16-mixed").convert(build_causal_lm("tiny", 257))
    assert bf16.config._attn_implementation == "lowbit_sdpa"
    bf16.save_pretrained(tmp_path)
    assert "lowbit" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_bf16_mixed_transformer_trains_through_the_rerouted_attention():
    precision = Precision("bf16-mixed")
    model = precision.convert(build_causal_lm("tiny", 257, seed=0))
    tokens = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(0))
    with precision.autocast():
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    precision.backward(loss)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
