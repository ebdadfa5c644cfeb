"""CPU attention in 16 bits with its slow kernels computed in fp32.

On a CPU, PyTorch's flash-attention backward is much slower in bf16 than in fp32 at small head
sizes: at the default workload's shapes (batch 16, 4 heads, 256 tokens, head size 32) 17.1 ms in
bf16 against 8.4 ms in fp32 per layer, while its bf16 forward is the faster one on a CPU with AMX
(`benchmarks/attention.py`, BENCHMARKS.md). In fp16, on a CPU without AVX512-FP16, both
directions are slow: on an AMD EPYC at the parity study's shape (batch 128, 2 heads, 64 tokens,
head size 32; one thread), the fp16 forward took 7.8 ms against fp32's 3.2 ms, and the backward
46.6 ms against 7.5 ms. `AttentionInFp32` reroutes `F.scaled_dot_product_attention`
on CPU tensors whose compute dtype is bf16 or fp16 (from autocast, or 16-bit inputs as in
`bf16-low` and `fp16-low`) through an autograd function whose

- forward is, for bf16, PyTorch's bf16 flash kernel, exactly as autocast would call it (the same
  output bits); for fp16, PyTorch's fp32 flash kernel on the fp16 operands, its output rounded to
  fp16 (the fp16 recipes emulate fp16 at the GEMM boundaries on a CPU, docs/recipes.md: fp16
  values in and out, fp32 arithmetic inside);
- saves what the 16-bit kernel saves (16-bit q, k, v and output, fp32 log-sum-exp), so memory is
  unchanged;
- backward runs PyTorch's fp32 flash backward on those saved tensors widened to fp32 and rounds
  the gradients to the 16-bit dtype. The 16-bit backward also accumulates in fp32; what differs
  is that the probabilities it recomputes and the products with them are not rounded to 16 bits
  in between.

A boolean mask (Transformers' padding masks) becomes the additive mask of 0 and -inf that
`F.scaled_dot_product_attention` itself hands the flash kernel; grouped-query attention
(``enable_gqa``, fewer key/value heads) is the flash kernels' own, as in PyTorch. Calls for which
PyTorch would not choose its flash kernel (``torch._fused_sdp_choice``: dropout, a mask that
needs a gradient, masks of other ranks, operands whose last dimension is strided, empty
sequences, unequal head or batch sizes, a ``sdpa_kernel`` context that rules it out), and
``is_causal`` with a mask, which this function does not take, run
`F.scaled_dot_product_attention` unchanged, as do CUDA tensors and other dtypes.

A torch-function mode sees every torch call made while it is active (~2,000 per step of the tiny
model, ~12 ms of Python in a cProfile of the first version, which wrapped the whole forward), so
it is entered only around attention itself: `route_attention`
switches a Hugging Face model from its ``sdpa`` attention to ``lowbit_sdpa``, the same function
(Transformers' own `sdpa_attention_forward`, the same masks) called inside the mode.
`Precision.convert` does this for bf16 and fp16 compute on CPU. The setting is not saved by
``save_pretrained`` (the folder says ``sdpa``); a model saved whole (``torch.save(model)``) keeps it
and registers ``lowbit_sdpa`` again when it is loaded (`_Registration`).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from lowbit.dynamo_marks import assume_constant_result
from lowbit.formats.eager_roundings import keep_eager_roundings

# The compute dtypes rerouted, and whether their forward runs in fp32 too (see above).
_FORWARD_IN_FP32 = {torch.bfloat16: False, torch.float16: True}
_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the attention would compute in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return query.dtype


class AttentionInFp32(TorchFunctionMode):
    """While active, CPU scaled-dot-product attention in bf16 runs its backward in fp32, and in
    fp16 its forward and backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "cpu":
            dtype = _compute_dtype(args[0])
            if dtype in _FORWARD_IN_FP32:
                query, key, value, *rest = args
                options = {**dict(zip(_OPTIONS, rest)), **kwargs}
                with torch.autocast("cpu", enabled=False):
                    return _attention(func, query, key, value, dtype, options)
        return func(*args, **kwargs)


def _attention(func, query, key, value, dtype: torch.dtype, options: dict) -> torch.Tensor:
    keep_eager_roundings()  # its output's rounding to 16 bits
    query, key, value = (t.to(dtype) for t in (query, key, value))
    mask = options.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)  # as autocast rounds it
    options = {**options, "attn_mask": mask}
    # a boolean mask (Transformers' padding masks) as the flash kernel reads it: the mask of 0
    # and -inf that `F.scaled_dot_product_attention` makes of it (ATen's convert_boolean_attn_mask)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
    if not _flash_takes(query, key, value, {**options, "attn_mask": mask}):
        return func(query, key, value, **options)
    is_causal = bool(options.get("is_causal", False))
    out, _ = _Fp32Attention.apply(
        query, key, value, mask, is_causal, options.get("scale"), _FORWARD_IN_FP32[dtype]
    )
    return out


def _flash_takes(query, key, value, options: dict) -> bool:
    """PyTorch would compute this call with its CPU flash kernel, as `_Fp32Attention` does.
    PyTorch's own choice decides (``torch._fused_sdp_choice``, 2 us): called directly, the kernel
    computes garbage from operands whose last dimension is strided, drops a mask's gradient,
    refuses 3-D masks, and crashes the process (SIGFPE) on an empty sequence. The remaining
    conditions are what `_Fp32Attention` does not implement."""
    mask = options.get("attn_mask")
    rest = (
        options.get("dropout_p") or 0.0,
        bool(options.get("is_causal", False)),
        options.get("scale"),
        bool(options.get("enable_gqa", False)),
    )
    if torch.compiler.is_compiling():
        layouts = tuple(None if t is None else _layout(t) for t in (query, key, value, mask))
        chosen = _traced_choice(layouts, rest)
    else:
        chosen = _choice(query, key, value, mask, rest)
    return (
        chosen == SDPBackend.FLASH_ATTENTION.value  # the choice is an int, not the enum
        and (mask is None or mask.is_floating_point())
        and not (options.get("is_causal") and mask is not None)
    )


def _choice(query, key, value, mask, rest: tuple) -> int:
    dropout_p, is_causal, scale, enable_gqa = rest
    return torch._fused_sdp_choice(
        query, key, value, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _layout(t: torch.Tensor) -> tuple:
    """What PyTorch's choice reads of a tensor, as constants a traced graph can pass on."""
    return tuple(t.shape), t.stride(), t.dtype, t.requires_grad


@assume_constant_result
def _traced_choice(layouts: tuple, rest: tuple) -> int:
    """`_choice` in a traced graph (`torch.compile`), decided while tracing: the chooser returns
    an int, which broke the graph at every attention, and on the traced operands (fake tensors)
    it answers "math" whatever they are. It is asked about uninitialized CPU tensors of the
    traced operands' shapes, strides, dtypes and ``requires_grad`` (pages never touched), so the
    graph takes the path eager takes, with eager's bits. Shapes the graph leaves dynamic are not
    constants: the graph breaks there, as before. An ``sdpa_kernel`` context is read when the
    graph is traced, not at each call."""
    tensors = [
        None
        if layout is None
        else torch.empty_strided(layout[0], layout[1], dtype=layout[2]).requires_grad_(layout[3])
        for layout in layouts
    ]
    return _choice(*tensors, rest)


class _Fp32Attention(torch.autograd.Function):
    """PyTorch's flash attention on 16-bit operands, its backward (and with ``fp32_forward`` its
    forward) computed in fp32; outputs and gradients in the operands' dtype. Returns the output
    and the log-sum-exp the backward reads (not differentiable): in the form with
    ``setup_context``, which torch.func's transforms take (``torch.func.grad`` of a model whose
    attention `route_attention` switched), a backward sees only the inputs and outputs."""

    @staticmethod
    def forward(query, key, value, mask, is_causal, scale, fp32_forward):
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if fp32_forward:
            out, logsumexp = kernel(
                query.float(),
                key.float(),
                value.float(),
                0.0,
                is_causal,
                attn_mask=None if mask is None else mask.float(),
                scale=scale,
            )
            return out.to(query.dtype), logsumexp
        return kernel(query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, value, mask, is_causal, scale, _ = inputs
        out, logsumexp = output
        ctx.mark_non_differentiable(logsumexp)
        ctx.save_for_backward(query, key, value, out, logsumexp, mask)
        ctx.is_causal, ctx.scale = is_causal, scale

    @staticmethod
    def backward(ctx, grad_out, _grad_logsumexp):
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
            attn_mask=None if mask is None else mask.float(),
            scale=ctx.scale,
        )
        return *(g.to(query.dtype) for g in grads), None, None, None, None


ATTENTION_NAME = "lowbit_sdpa"  # Transformers' attention-implementation name of the rerouted sdpa


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """Transformers' ``sdpa`` attention, its slow CPU 16-bit kernels in fp32 (`AttentionInFp32`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with AttentionInFp32():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def route_attention(model: torch.nn.Module) -> bool:
    """Switch a Hugging Face model using ``sdpa`` attention to ``lowbit_sdpa``; True if switched.

    Other models are left as they are (their attention keeps PyTorch's 16-bit kernels), and so
    are models whose code branches on the name ``sdpa`` (`_tests_for_sdpa`)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not hasattr(model, "set_attn_implementation") or _tests_for_sdpa(model):
        return False
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    registration = _Registration()
    for module in model.modules():  # the model and its parts whose config names lowbit_sdpa
        if getattr(getattr(module, "config", None), "_attn_implementation", None) == ATTENTION_NAME:
            module.lowbit_attention_registration = registration
    return True


# A comparison of the attention implementation's name with "sdpa" in a model's code:
# ``config._attn_implementation in ("eager", "sdpa")`` (DeepSeek-V3.2's, GLM-MoE-DSA's and
# Mistral-Large-4's sparse attention mask the unselected keys only then, and otherwise hand
# ``sparse_indices`` to a kernel that reads them), ``== "sdpa"`` (GLM-5-Next's mask, Gemma 4's
# logits_to_keep).
_SDPA_NAMED = re.compile(r"""_attn_implementation\s*(?:[!=]=|(?:not\s+)?in\b)[^\n]*["']sdpa["']""")


def _tests_for_sdpa(model: torch.nn.Module) -> bool:
    """Whether the code of any of ``model``'s modules compares its attention implementation with
    the name ``sdpa``: under ``lowbit_sdpa`` that code takes the branch of another implementation
    (DeepSeek-V3.2's attention would attend to every key instead of its selected top-k: other
    logits, silently), so such a model keeps Transformers' own ``sdpa``."""
    return any(_source_names_sdpa(name) for name in {type(m).__module__ for m in model.modules()})


@functools.cache
def _source_names_sdpa(module_name: str) -> bool:
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):  # no source (a built-in, a frozen or compiled module)
        return False
    return _SDPA_NAMED.search(source) is not None


def _register() -> None:
    """Make ``lowbit_sdpa`` a name Transformers' attention and mask interfaces know."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _sdpa_in_fp32)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class _Registration:
    """Held by a model `route_attention` switched (and by each part whose config names
    ``lowbit_sdpa``): a model saved whole (``torch.save(model)``, pickle) keeps that name in its
    pickled config, and Transformers refuses a name it does not know, so unpickling this object
    registers ``lowbit_sdpa`` again, in a new process too, before the model can run."""

    def __reduce__(self):
        return _registered, ()


def _registered() -> _Registration:
    _register()
    return _Registration()
