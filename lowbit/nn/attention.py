"""Attention of bf16 CPU recipes computed by PyTorch's fp32 kernel on the bf16 values.

On a CPU, PyTorch's flash-attention kernel is slower in bf16 than in fp32: at the default
workload's shapes (batch 16, 4 heads, 256 tokens, head size 32) its backward takes 16.7 ms in bf16
against 8.2 ms in fp32 per layer (`benchmarks/attention.py`, BENCHMARKS.md), so bf16 recipes spent
about a quarter of their step there. `AttentionInFp32` reroutes `F.scaled_dot_product_attention`
on CPU tensors whose compute dtype is bf16 (from autocast, or bf16 inputs as in `bf16-low`):

    q, k, v  ->  round to bf16  ->  fp32 flash kernel  ->  output rounded to bf16

The attention sees the same bf16 operands and returns the same dtype as the bf16 kernel, and it
saves the same tensors for the backward (bf16 q, k, v and output, fp32 log-sum-exp), so memory is
unchanged; the backward runs the fp32 kernel on those and rounds the gradients to bf16. What
differs from the bf16 kernel is inside: the probabilities stay fp32 for the second product, where
the bf16 kernel (like FlashAttention on a GPU) rounds them to bf16; both accumulate in fp32.
Calls the fp32 flash kernel does not take as they are (dropout, boolean masks, grouped-query
broadcasting, unequal head sizes) run `F.scaled_dot_product_attention` on fp32 copies instead. CUDA tensors and
other dtypes pass through untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_ROUTED = (torch.bfloat16,)
_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the attention would compute in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return query.dtype


class AttentionInFp32(TorchFunctionMode):
    """While active, CPU bf16 scaled-dot-product attention runs PyTorch's fp32 kernel."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "cpu":
            dtype = _compute_dtype(args[0])
            if dtype in _ROUTED:
                query, key, value, *rest = args
                options = {**dict(zip(_OPTIONS, rest)), **kwargs}
                with torch.autocast("cpu", enabled=False):
                    return _attention(query, key, value, dtype, options)
        return func(*args, **kwargs)


def _attention(query, key, value, dtype: torch.dtype, options: dict) -> torch.Tensor:
    query, key, value = (t.to(dtype) for t in (query, key, value))
    mask = options.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype).float()
    is_causal = bool(options.get("is_causal", False))
    if _flash_takes(query, key, value, options):
        return _Fp32FlashAttention.apply(query, key, value, mask, is_causal, options.get("scale"))
    out = F.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), **{**options, "attn_mask": mask}
    )
    return out.to(dtype)


def _flash_takes(query, key, value, options: dict) -> bool:
    """The fp32 flash kernel computes this call as `F.scaled_dot_product_attention` would."""
    return (
        query.dim() == key.dim() == value.dim() == 4
        and query.shape[:2] == key.shape[:2] == value.shape[:2]
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and key.shape[-2] == value.shape[-2]
        and not options.get("dropout_p")
        and not options.get("enable_gqa")
        and (options.get("attn_mask") is None or options["attn_mask"].is_floating_point())
        and not (options.get("is_causal") and options.get("attn_mask") is not None)
    )


class _Fp32FlashAttention(torch.autograd.Function):
    """Flash attention on fp32 copies of bf16 operands, saving the bf16 tensors for backward."""

    @staticmethod
    def forward(ctx, query, key, value, mask, is_causal, scale):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.float(), key.float(), value.float(), 0.0, is_causal, attn_mask=mask, scale=scale
        )
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, logsumexp, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, logsumexp, mask = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(),
            query.float(),
            key.float(),
            value.float(),
            out.float(),
            logsumexp,
            0.0,
            ctx.is_causal,
            attn_mask=mask,
            scale=ctx.scale,
        )
        return *(g.to(query.dtype) for g in grads), None, None, None
