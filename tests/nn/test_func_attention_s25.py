"""torch.func.grad through the attention lowbit reroutes (`AttentionInFp32`, `route_attention`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import lowbit
from lowbit.models import build_causal_lm
from lowbit.nn.attention import AttentionInFp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [False, True])
def test_torch_func_grad_of_rerouted_attention_has_autograds_bits(dtype, mask):
    """The rerouted attention's autograd function had no ``setup_context``: torch.func.grad
    through it failed ("must override the setup_context staticmethod")."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=gen, dtype=dtype) for _ in range(3))
    attn_mask = torch.randn(16, 16, generator=gen, dtype=dtype) if mask else None

    def loss_of(q, k, v):
        with AttentionInFp32():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.float().pow(2).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss_of(*leaves).backward()
    grads = grad(loss_of, argnums=(0, 1, 2))(q, k, v)
    for got, leaf in zip(grads, leaves, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, leaf.grad)


def _sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (other.double() - reference.double()).pow(2).sum().clamp_min(1e-300)
    return 10 * torch.log10(reference.double().pow(2).sum() / noise).item()


def test_torch_func_grad_of_a_converted_llama_agrees_with_backward():
    """A whole converted Llama under torch.func.grad (rerouted attention and lowbit layers).
    Not bit for bit: torch.func computes the embedding's and the loss's backward with its own
    decompositions (in fp32, plain PyTorch, they differ from autograd's by ~1e-7); bf16-mixed
    rounds those differences, measured at 44.9 dB for its worst parameter."""
    precision = lowbit.Precision("bf16-mixed")
    model = precision.convert(build_causal_lm("nano", 257, seed=0))
    assert model.config._attn_implementation == "lowbit_sdpa"  # the reroute is in the model
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss_of(module, params=None):
        with precision.autocast():
            out = module(tokens) if params is None else functional_call(module, params, (tokens,))
        return F.cross_entropy(out.logits.flatten(0, 1).float(), tokens.flatten())

    reference = copy.deepcopy(model)
    loss_of(reference).backward()
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = grad(lambda p: loss_of(model, p))(params)
    for name, p in reference.named_parameters():
        assert _sqnr_db(p.grad, grads[name]) > 30, name
