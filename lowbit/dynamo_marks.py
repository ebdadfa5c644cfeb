"""`torch.compiler`'s marks for Dynamo, set without importing Dynamo.

``torch.compiler.assume_constant_result(fn)`` imports ``torch._dynamo`` to set one attribute:
about a second of every process's ``import lowbit`` (half of it; 2 cores, torch 2.13), paid by
each rank, worker and CLI call whether it compiles or not. Dynamo reads the attribute when it
traces a call, by which time a compiling process has imported it. tests/nn/test_dynamo_marks_s33.py
checks that the mark is the one torch's decorator sets. And `cache`, a bounded
``functools.lru_cache`` that a traced graph may call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result``: Dynamo runs ``fn`` while tracing and keeps its
    result as a constant of the graph."""
    fn._dynamo_marked_constant = True
    return fn


# The most answers `cache` keeps per function. Its keys are small values (an `OperandSpec`, a
# convolution's sizes along one axis), but one per shape met: a run over images of many sizes, or
# a process converting model after model (`lowbit compare`, a notebook), met ever more of them.
MOST_ANSWERS = 1024


def cache(fn: Callable) -> Callable:
    """``functools.lru_cache`` of ``fn`` (hashable positional arguments), keeping the
    `MOST_ANSWERS` answers last used, for a function that a traced graph calls: Dynamo traces
    through an ``lru_cache`` wrapper with a warning at every compile. Traced, ``fn`` is traced and
    the cache left alone: a write to it inside a traced autograd function is a side effect Dynamo
    refuses, and a read guards the graph on what the cache holds, recompiling it once an eager
    call adds the answer (a compiled model's first step before an eager one)."""
    answers = functools.lru_cache(maxsize=MOST_ANSWERS)(fn)

    @functools.wraps(fn)
    def cached(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        return answers(*args)

    return cached
