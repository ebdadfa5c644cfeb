"""Session 31's hunt on the CPU attention reroute (lowbit.nn.attention): which calls take the
fp32-backward flash path is PyTorch's own choice of kernel, boolean padding masks and
grouped-query attention take it too, and every other call is PyTorch's, bit for bit."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.formats.error import sqnr
from lowbit.nn.attention import AttentionInFp32

DTYPES = [torch.bfloat16, torch.float16]


def tensors(*shapes, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape in shapes]


def grads(out, inputs, dtype=None, seed=1):
    """Gradients for a random output gradient in ``dtype`` (default: the output's)."""
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, grad.to(dtype or out.dtype).to(out.dtype))


def rerouted(*args, **kwargs):
    with AttentionInFp32():
        return F.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_operands_strided_in_their_last_dimension_get_pytorchs_result(dtype):
    # the flash kernel called directly read q, k, v of stride != 1 in the last dimension as if
    # contiguous: another attention altogether (-3 dB against PyTorch's), without a word
    q, k, v = (t.transpose(-1, -2) for t in tensors(*[(2, 3, 16, 40)] * 3, dtype=dtype))
    out = rerouted(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_mask_that_needs_a_gradient_gets_it(dtype):
    # a learned position bias (Transformers' T5-style ``position_bias`` under sdpa) is a float
    # mask with requires_grad; the reroute returned no gradient for it, so it never trained
    q, k, v, bias = tensors(*[(2, 3, 40, 16)] * 3, (1, 3, 40, 40), dtype=dtype)
    ours = grads(rerouted(q, k, v, attn_mask=bias), (q, k, v, bias))
    want = grads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), (q, k, v, bias))
    assert all(torch.equal(a, b) for a, b in zip(ours, want))


def test_a_3d_mask_runs_as_in_pytorch():
    # PyTorch broadcasts a (heads x L x S) mask; the flash kernel refused it with its own error
    q, k, v, mask = tensors(*[(2, 3, 40, 16)] * 3, (3, 40, 40))
    out = rerouted(q, k, v, attn_mask=mask.detach())
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask.detach()))


def test_a_math_only_sdpa_kernel_context_is_honoured():
    q, k, v = tensors(*[(2, 3, 40, 16)] * 3)
    with sdpa_kernel(SDPBackend.MATH):
        out = rerouted(q, k, v, is_causal=True)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_an_empty_sequence_does_not_crash_the_process():
    # the flash kernel called directly on a zero-length sequence died with SIGFPE, taking the
    # Python process with it; PyTorch returns an empty output
    code = (
        "import torch, torch.nn.functional as F\n"
        "from lowbit.nn.attention import AttentionInFp32\n"
        "q = torch.randn(2, 3, 0, 16, dtype=torch.bfloat16, requires_grad=True)\n"
        "with AttentionInFp32():\n"
        "    out = F.scaled_dot_product_attention(q, q, q)\n"
        "out.sum().backward()\n"
        "assert out.shape == q.shape and q.grad.shape == q.shape\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-500:]


def padding_mask():
    """Transformers' sdpa mask of a padded batch: the second sequence's last 10 tokens padding."""
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    mask[1, :, :, 30:] = False
    return mask


CASES = {
    # token classification / causal LM with padded batches: Transformers' sdpa masks are boolean
    "padding mask": dict(shapes=[(2, 3, 40, 16)] * 3, attn_mask=padding_mask()),
    # Llama-3 and Qwen style models without a mask: Transformers passes enable_gqa
    "grouped-query": dict(
        shapes=[(2, 4, 40, 16), (2, 2, 40, 16), (2, 2, 40, 16)], is_causal=True, enable_gqa=True
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_padding_masks_and_grouped_query_attention_get_the_fp32_backward(case, dtype):
    # both ran PyTorch's 16-bit backward: the reroute took neither boolean masks nor enable_gqa
    options = dict(CASES[case])
    q, k, v = tensors(*options.pop("shapes"), dtype=dtype)
    out = rerouted(q, k, v, **options)
    kernel_16_bit = F.scaled_dot_product_attention(q, k, v, **options)
    exact = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), **options)
    if dtype == torch.bfloat16:  # PyTorch's bf16 kernel, the same bits
        assert torch.equal(out, kernel_16_bit)
    else:  # fp32 arithmetic on the fp16 values, rounded once
        fp32 = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), **options)
        assert torch.equal(out, fp32.to(dtype))
    for ours, theirs, want in zip(
        grads(out, (q, k, v)), grads(kernel_16_bit, (q, k, v)), grads(exact, (q, k, v), dtype)
    ):
        assert ours.dtype == dtype and ours.shape == want.shape
        # measured: bf16 53-90 dB against PyTorch's 48-50, fp16 71-144 against 66-69
        assert sqnr(want.float(), ours.float()) > sqnr(want.float(), theirs.float()) + 2


def test_dropout_draws_the_same_random_numbers_as_pytorch():
    # a run's dropout masks, and every draw after them, must not depend on lowbit's reroute
    q, k, v = tensors(*[(2, 3, 40, 16)] * 3)
    torch.manual_seed(0)
    out = rerouted(q, k, v, dropout_p=0.3)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=0.3))
    assert torch.equal(after, torch.rand(4))
