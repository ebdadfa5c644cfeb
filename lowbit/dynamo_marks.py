"""`torch.compiler`'s marks for Dynamo, set without importing Dynamo.

``torch.compiler.assume_constant_result(fn)`` imports ``torch._dynamo`` to set one attribute:
about a second of every process's ``import lowbit`` (half of it; 2 cores, torch 2.13), paid by
each rank, worker and CLI call whether it compiles or not. Dynamo reads the attribute when it
traces a call, by which time a compiling process has imported it. tests/nn/test_dynamo_marks_s33.py
checks that the mark is the one torch's decorator sets.
"""

from __future__ import annotations

from collections.abc import Callable


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result``: Dynamo runs ``fn`` while tracing and keeps its
    result as a constant of the graph."""
    fn._dynamo_marked_constant = True
    return fn
