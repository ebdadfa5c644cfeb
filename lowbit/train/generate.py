"""Sampling text from a trained causal LM (temperature, top-k, top-p, seeded), with the recipe's
numerics."""

from __future__ import annotations

import inspect
import math
import sys
import unicodedata
from contextlib import contextmanager

import torch

from lowbit.errors import UsageError
from lowbit.models.causal_lm import max_positions
from lowbit.train.tasks import evaluating

# ATen's `at::internal::GRAIN_SIZE`: the fewest elements its parallel loops hand a thread
GRAIN_SIZE = 32768


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    top_p: float = 1.0,
    flags: bool = False,
) -> None:
    """Refuse sampling settings out of range in one line (`sample_text`; `lowbit generate` asks
    before it loads the model, which takes seconds for a large one). With ``flags`` the message
    names the option the user typed (``--top-k``), not this function's parameter (``top_k``)."""
    name = _FLAGS.get if flags else lambda parameter: parameter
    if max_new_tokens < 0:
        raise UsageError(
            f"{name('max_new_tokens')} {max_new_tokens} is negative; fix: use 0 or more"
        )
    if not temperature >= 0 or math.isinf(temperature):  # nan fails the comparison
        raise UsageError(
            f"{name('temperature')} {temperature} is not a finite value >= 0; fix: use 0 "
            "(greedy) or more"
        )
    if top_k is not None and top_k < 0:
        raise UsageError(f"{name('top_k')} {top_k} is negative; fix: use 0 (no limit) or more")
    if not 0 <= seed < 2**32:  # `lowbit train`'s range (torch's generator fails from 2**64)
        raise UsageError(
            f"{name('seed')} must be in [0, 2**32), got {seed}; fix: e.g. "
            + ("--seed 0" if flags else "seed=0")
        )
    if not 0 < top_p <= 1:  # nan fails the comparison; 0 would keep no token but the likeliest
        raise UsageError(
            f"{name('top_p')} {top_p} is not in (0, 1]; fix: use e.g. 0.9 (1 keeps every token: "
            "no limit)"
        )


# `lowbit generate`'s option for each of `check_sampling`'s parameters
_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "seed": "--seed",
    "top_p": "--top-p",
}


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` (the last axis: the vocabulary) with every token outside the nucleus set to
    -inf: the nucleus is the smallest set of likeliest tokens whose probabilities add up to
    ``top_p`` or more, and it always holds the likeliest token (Holtzman et al. 2020).

    The arithmetic is transformers' ``TopPLogitsWarper`` (sort ascending, cumulative softmax,
    drop while the sum is <= 1 - top_p), so that a ``top_p`` samples the same distribution here
    as in ``model.generate``; tests compare the two bit for bit. Tokens already at -inf (cut by
    top-k) have probability 0 and stay cut."""
    sorted_logits, sorted_ids = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False  # the likeliest token stays, whatever top_p
    drop = drop_sorted.scatter(-1, sorted_ids, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_text(
    model,
    tokenizer,
    precision,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    top_p: float = 1.0,
    say_cut: bool = True,
) -> str:
    """``prompt`` followed by up to ``max_new_tokens`` sampled tokens (greedy at temperature 0),
    drawn among the ``top_k`` likeliest (0 or None: among all, as transformers' ``top_k=0``),
    and of those, in the nucleus of probability ``top_p`` (1: all; `top_p_filter`). The order is
    transformers': temperature, then top-k, then top-p.

    Stops early at the end-of-text token or at the model's maximum positions, which a note on
    stderr says when ``say_cut`` (`lowbit generate`; the trainer's own sample asks no length).
    The global RNG is untouched: sampling draws from its own generator seeded by ``seed``. A
    model may have more output ids than the tokenizer (a GPT-2 config's 50,257 trained on byte
    tokens): those ids decode to nothing, so they are never sampled.
    """
    check_sampling(max_new_tokens, temperature, top_k, seed, top_p)
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    limit = max_positions(model)  # None: no position limit (ALiBi)
    if limit is not None and len(ids) > limit:
        raise UsageError(
            f"the prompt has {len(ids)} tokens, the model takes {limit}; fix: shorten it"
        )
    # the last token sampled is never fed back: a prompt of L tokens leaves room for
    # limit - L + 1 new ones (the forwards cover positions 0 .. limit - 1), one at the limit
    steps = max_new_tokens if limit is None else min(max_new_tokens, limit - len(ids) + 1)
    if steps < max_new_tokens and say_cut:
        print(
            f"lowbit: note: the model takes {limit} positions and the prompt has {len(ids)} "
            f"tokens: at most {steps} new token{'s' if steps != 1 else ''}, not {max_new_tokens}",
            file=sys.stderr,
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    # transformers 5 renamed past_key_values to cache (argument and output field)
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    new: list[int] = []
    with evaluating(model, precision), _decoding_threads(model):
        inputs, past = torch.tensor([ids], device=device), None
        for _ in range(steps):
            out = model(input_ids=inputs, use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)
            logits = out.logits[0, -1, : tokenizer.vocab_size].float()
            top = float(logits.max())  # NaN where any logit is: one pass, one sync a token
            if math.isnan(top):  # argmax would pick an arbitrary id, multinomial fails
                raise UsageError(
                    f"the model's output is NaN at new token {len(new) + 1} (its weights or "
                    "activations are not finite: a diverged checkpoint?); fix: generate from an "
                    "earlier checkpoint (--checkpoint STEP) or a run that trained stably"
                )
            scaled = logits / temperature if temperature else logits
            # greedy at 0, and at a temperature so small that the largest logits overflow to inf
            # or, below float32's smallest value, a logit of 0 divides to nan (softmax would give
            # nan): greedy is its limit
            if temperature == 0 or not torch.isfinite(scaled.max()):
                token = int(logits.argmax())
            else:
                if top_k and top_k < scaled.numel():  # 0 or None: no limit
                    cutoff = torch.topk(scaled, top_k).values[-1]
                    scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
                if top_p < 1:
                    scaled = top_p_filter(scaled, top_p)
                probs = torch.softmax(scaled, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token == tokenizer.eot_id:
                break
            new.append(token)
            inputs = torch.tensor([[token]], device=device)
    return prompt + _continuation(tokenizer, ids, new)


def _mean_matrix(model) -> float:
    """Mean elements of the model's matrices (weights, and a quantized layer's packed buffers):
    the multiply-adds of a typical matrix-vector product while decoding one token."""
    matrices = [t.numel() for t in (*model.parameters(), *model.buffers()) if t.dim() >= 2]
    return sum(matrices) / max(len(matrices), 1)


@contextmanager
def _decoding_threads(model):
    """Sample a small model on one intra-op thread. Decoding runs matrix-vector products, a few
    a layer and token; oneDNN's bf16 GEMM (autocast's, on a CPU) hands even a 64x64 one to every
    thread, and the hand-off, not the arithmetic, then costs the time: 7.5 ms of CPU per 64x64
    linear on 2 threads of a loaded 2-core machine, 0.01 ms on one (~100 ms of CPU per token of
    the nano model instead of ~2). ATen's own loops take a second thread only for more than
    `GRAIN_SIZE` elements each: a model whose typical product gives two threads less than that
    gets one. The tokens sampled are the same (tests/infer/test_generate_speed_s35.py)."""
    threads = torch.get_num_threads()
    if _mean_matrix(model) < 2 * GRAIN_SIZE:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of ``new_ids`` as it reads after the prompt. Decoded alone, the first word of a
    SentencePiece-style tokenizer (Llama's, Mistral's, Gemma's: "▁world") loses the space its
    "▁" stands for ("hello" + "world"); decoded after the prompt's ids, it keeps it."""
    before = tokenizer.decode(prompt_ids)
    text = tokenizer.decode([*prompt_ids, *new_ids])
    return text[len(before) :] if text.startswith(before) else tokenizer.decode(new_ids)


def visible(text: str) -> str:
    """``text`` with its control characters (ESC, NUL, ...) written as escapes (``\\x1b``): a
    byte-level model early in training samples any byte, and a raw escape sequence in the run
    summary would drive the terminal instead of showing what the model wrote."""
    return "".join(
        c.encode("unicode_escape").decode() if _control(c) and c != "\t" else c for c in text
    )


def _control(c: str) -> bool:
    """A control character (Cc: ESC, NUL, CR, ...) or a format one (Cf: U+202E reverses the
    text that follows on a terminal), except the zero-width joiners text uses."""
    kind = unicodedata.category(c)
    return kind == "Cc" or (kind == "Cf" and c not in "\u200c\u200d")


def print_encodable(text: str) -> None:
    """Print ``text``; the characters standard output's encoding cannot hold (an ASCII or
    Latin-1 locale, Windows' cp1252 for a redirected file) are written as escapes (``\\ufffd``)
    with a warning: a byte-level model samples any character, U+FFFD for bytes that are not
    UTF-8, and a UnicodeEncodeError traceback would end the command after the sampling with
    nothing printed (`lowbit generate`'s sample, and the one in `lowbit train`'s summary)."""
    encoding = sys.stdout.encoding or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError as error:
        print(
            f"lowbit: warning: standard output's encoding ({encoding}) cannot write "
            f"U+{ord(text[error.start]):04X} (character {error.start}); such characters are "
            "written as escapes; fix: set PYTHONUTF8=1 (or PYTHONIOENCODING=utf-8) for UTF-8 "
            "output",
            file=sys.stderr,
        )
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    print(text)
