"""Measuring the memory of a live run by tensor accounting.

`measure(model, optimizer, precision)` sums the bytes of the tensors a run holds: the model's
parameters and their ``.grad``, the `Precision` object's fp32 master weights or Kahan buffers, and
the optimizer's state tensors (torchao's quantized states are counted through their inner
tensors: codes, block scales and code maps). Tensors sharing a storage are counted once.

Activations: a CPU has no ``torch.cuda.max_memory_allocated``, and the process's resident memory
mixes in the allocator's caching and the Python heap, so `measure_activations` counts what the
forward pass saves for the backward, which is what activation memory *is*: every tensor passed to
autograd's pack hook (``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage,
parameters excluded. Saved tensors that are casts of a parameter (autocast's bf16 weight copies)
or a converted layer's quantized weight (`lowbit.nn.linear.kept_weight_copies`) are reported as
``temporaries``. The backward's first transient, the gradient of the logits, is measured by
running the loss's backward up to the model (`loss_gradient_peak`), and what the step's peak
holds beyond these by running the whole backward with the CPU allocator recorded
(`measure_activations`' ``backward``, `Allocations`; on a GPU, ``torch.cuda.max_memory_allocated``
is the peak). Not seen: tensors an autograd function keeps on ``ctx`` outside
``save_for_backward``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lowbit.errors import UsageError
from lowbit.memory.breakdown import Breakdown


def _leaves(t: torch.Tensor) -> Iterable[torch.Tensor]:
    """The plain tensors holding ``t``'s memory (a tensor subclass's inner tensors)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):  # not a DTensor's device mesh
                yield from _leaves(inner)
    else:
        yield t


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr(), storage.nbytes())


def tensor_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (also across calls sharing
    ``seen``)."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        for leaf in _leaves(tensor):
            key = _storage_key(leaf)
            if key not in seen:
                seen.add(key)
                total += key[2]
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def measure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision=None) -> Breakdown:
    """The live run's parameters, gradients, master weights/Kahan buffers and optimizer states.

    Call it after ``precision.backward(loss)`` (gradients exist) of a step after the first
    (optimizer states and master weights are created by the first ``step``). Activations are
    measured separately (`measure_activations`).
    """
    seen: set = set()
    params = list(model.parameters())
    out = Breakdown(num_params=sum(p.numel() for p in params))
    out.parameters = tensor_bytes((p.data for p in params), seen)
    out.gradients = tensor_bytes((p.grad for p in params), seen)
    update = getattr(precision, "update", None)
    buffers = [
        *getattr(update, "masters", {}).values(),
        *getattr(update, "compensation", {}).values(),
    ]
    out.master_weights = tensor_bytes(buffers, seen)
    out.optimizer_states = tensor_bytes(optimizer_state_tensors(optimizer), seen)
    if not any(p.grad is not None for p in params):
        out.notes.append("no gradients were live: measure after backward")
    if not optimizer.state:
        out.notes.append("no optimizer states yet: measure after the first optimizer step")
    return out


_VIEWS = {
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ExpandBackward0",
    "AliasBackward0",
}


def is_parameter_cast(t: torch.Tensor) -> bool:
    """A tensor made by casting a parameter or a view of one (autocast's weight copy; Falcon's
    ``x @ self.weight.T`` casts the transposed view), or a view of such a cast: its grad_fn chain
    is views, a copy, views, then a leaf's AccumulateGrad."""

    def skip_views(fn):
        while fn is not None and type(fn).__name__ in _VIEWS:
            fn = fn.next_functions[0][0] if fn.next_functions else None
        return fn

    fn = skip_views(t.grad_fn)
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(
        type(skip_views(nf)).__name__ == "AccumulateGrad" for nf, _ in fn.next_functions if nf
    )


@contextlib.contextmanager
def _not_recording(model: torch.nn.Module):
    """Within: the delayed-scaling amax histories of ``model``'s converted layers record nothing.
    A measuring forward is no training step: recorded, its amaxes (dropout draws other masks than
    the step's own forward) entered the next commit, and a run that measured its memory (the
    trainer's report at step 2) scaled its fp8 operands otherwise from then on."""
    histories = [
        history
        for module in model.modules()
        for history in getattr(getattr(module, "lowbit_state", None), "histories", {}).values()
    ]
    recording = [history.recording for history in histories]
    for history in histories:
        history.recording = False
    try:
        yield
    finally:
        for history, was in zip(histories, recording, strict=True):
            history.recording = was


# The backward nodes of what a loss does to a model's output (`_loss_chain`): cross-entropy's
# nll and log-softmax, the fp32 cast and the views of the logits; each takes one tensor
_LOSS_SIDE = _VIEWS | {
    "NllLossBackward0",
    "NllLoss2DBackward0",
    "LogSoftmaxBackward0",
    "ToCopyBackward0",
    "CloneBackward0",
    "ReshapeAliasBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "UnsqueezeBackward0",
}
# and those on its values before the nll (``loss / accum``, ``loss * weight``, a
# ``reduction="none"`` loss's mean): elsewhere a Mul is the model's (Gemma 2's logit softcap)
_ON_LOSS_VALUES = {"MulBackward0", "DivBackward0", "MeanBackward0", "SumBackward0"}


def _loss_chain(loss) -> tuple[list, tuple | None]:
    """The backward nodes from ``loss`` to the model's output, each a one-input op of the loss
    (`_LOSS_SIDE`, `_ON_LOSS_VALUES`: a cross-entropy's nll and log-softmax, the fp32 cast and
    views of the logits), and the edge out of the last into the first node that is none (the
    model's output layer, its GEMM; a frozen one's reads no trained weight but is no loss op
    either), or None where there is no such chain: ``loss`` no scalar tensor with a graph (a
    non-scalar output, a Hugging Face output object), or a chain that ends at a leaf, branches
    or starts with no loss op. Nothing past the edge runs in `loss_gradient_peak`, so the
    model's layers are never touched."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.grad_fn is None:
        return [], None
    chain, node, edge = [], loss.grad_fn, None
    while type(node).__name__ in _LOSS_SIDE or (
        type(node).__name__ in _ON_LOSS_VALUES
        and not any(type(n).__name__.startswith("NllLoss") for n in chain)
    ):
        chain.append(node)
        edges = [edge for edge in node.next_functions if edge[0] is not None]
        if len(edges) != 1 or type(edges[0][0]).__name__ == "AccumulateGrad":
            return chain, None  # the loss of no layer's output: nothing to stop at
        edge = edges[0]
        node = edge[0]
    return chain, edge


def loss_gradient_peak(loss, retain_graph: bool = False) -> int:
    """The most bytes the backward of ``loss`` holds at once before it reaches the model (the
    estimate's ``logits_gradient``), measured by running that part alone
    (``torch.autograd.grad`` to the edge into the model's output layer, `_loss_chain`: no
    ``.grad`` is written, no layer's backward runs, ``loss``'s graph is freed). As each node
    runs, its incoming gradient and the one it makes are live (the engine frees the incoming one
    after it), counted by storage: for cross-entropy, the log-softmax's two fp32 gradients of
    the logits' size. 0 where ``loss`` is no scalar tensor or no chain of loss ops on a layer's
    output. ``retain_graph``: keep the graph for a backward after (`measure_activations`)."""
    chain, edge = _loss_chain(loss)
    if edge is None:
        return 0
    peak = 0

    def count(grad_inputs, grad_outputs):
        nonlocal peak
        peak = max(peak, tensor_bytes([*grad_inputs, *grad_outputs]))

    handles = [node.register_hook(count) for node in chain]
    try:
        torch.autograd.grad(
            loss, inputs=[torch.autograd.graph.GradientEdge(*edge)], retain_graph=retain_graph
        )
    finally:
        for handle in handles:
            handle.remove()
    return peak


def measure_activations(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], backward: bool = False
) -> Breakdown:
    """Bytes saved for backward while ``forward()`` (the forward pass and loss of one training
    step, in the recipe's autocast) runs; returns ``activations`` and ``temporaries`` (parameter
    casts), and ``logits_gradient``, the loss backward's transient before it reaches the model's
    output layer (`loss_gradient_peak`: no ``.grad`` is written, the loss's graph is freed; 0
    where ``forward`` returns no scalar tensor, e.g. the logits or a Hugging Face output object).
    With ``backward`` (a model on the CPU, no profiler already on: the user's would end with
    ours, so the workspace is left at 0 under one), the whole backward runs too
    (`_backward_dropping_gradients`: no ``.grad`` is changed), the CPU allocator recorded from the
    forward's start to the backward's end (`Allocations`), and ``backward_workspace`` is what that peak holds beyond the activations, temporaries and
    logits' gradient: each layer's backward workspace, and what the forward leaves alive outside
    the saved tensors (a shared quantization of the last input, `lowbit.nn.operand`); 0 where
    ``forward`` returns no scalar loss on a layer's output. With it, the model states and these
    rows add up to the forward and backward's peak, less the batch (saved inputs made before the
    forward, its token ids or images, are in the activations but not in the peak's rise, so the
    workspace is short by them); the step's peak unless its gradient clipping or optimizer step
    holds more (docs/memory.md: a tiny batch's AdamW step peaks above the table's total). Its
    random draws (stochastic rounding's seeds) are the caller's to fork too.
    The forward leaves the layers' delayed-scaling amax histories as they were (`_not_recording`);
    its random draws (dropout) are the caller's to fork (``torch.random.fork_rng``). One
    process's unsharded model only: FSDP frees each block's gathered parameters after its forward
    and reuses their memory, so storages would not say which tensor a saved one is."""
    from torch.distributed.tensor import DTensor

    from lowbit.nn.linear import kept_weight_copies

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise UsageError(
            "measure_activations needs an unsharded model (an FSDP model's parameters are "
            "DTensors); fix: measure the model in one process before sharding it"
        )
    param_storages = {_storage_key(p) for p in model.parameters()}
    seen: set = set(param_storages)
    totals = {"activations": 0, "temporaries": 0}

    def pack(t: torch.Tensor):
        if is_traceable_wrapper_subclass(t) or t.device.type == "meta":
            return t
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            # a converted layer saves its quantized weight after its forward recorded it
            copy = is_parameter_cast(t) or any(key == _storage_key(w) for w in weight_copies)
            totals["temporaries" if copy else "activations"] += key[2]
        return t

    # On a GPU the run's own peak is torch.cuda.max_memory_allocated (its summary prints it)
    devices = {p.device.type for p in model.parameters()}
    # nor under a profiler already on (the user's): stopping ours ended theirs, its events lost
    backward = backward and devices <= {"cpu"} and not torch.autograd.profiler._is_profiler_enabled
    # recorded from the forward's start: the free of a tensor allocated before the records began
    # is not recorded, so the activations the backward frees must be made within; the histories
    # record nothing in the forward, the loss's backward, nor the whole backward
    with _not_recording(model), Allocations() if backward else _NoRecords() as allocations:
        allocations.mark("start")
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            kept_weight_copies() as weight_copies,
        ):
            loss = forward()
        logits_gradient = loss_gradient_peak(loss, retain_graph=backward)
        if backward and logits_gradient:  # a scalar loss on a layer's output
            _backward_dropping_gradients(loss, model)
        allocations.mark("end")
    workspace = 0
    if backward and logits_gradient:
        peak = allocations.rise(allocations.marks["start"][0], allocations.marks["end"][0])
        workspace = max(0, peak - sum(totals.values()) - logits_gradient)
    return Breakdown(
        activations=totals["activations"],
        temporaries=totals["temporaries"],
        logits_gradient=logits_gradient,
        backward_workspace=workspace,
        num_params=sum(p.numel() for p in model.parameters()),
    )


class _NoRecords(contextlib.nullcontext):
    """`Allocations`' stand-in where nothing is recorded: its marks do nothing."""

    def __enter__(self) -> _NoRecords:
        return self

    def mark(self, label: str) -> None:
        pass


def _backward_dropping_gradients(loss: torch.Tensor, model: torch.nn.Module) -> None:
    """Run the backward of ``loss`` to ``model``'s trainable parameters, each gradient freed as
    it is made (a post-accumulate hook), every ``.grad`` left as it was; ``loss``'s graph is
    freed. What it holds at its peak above its start is then what the backward holds besides
    the gradients it makes: the logits' gradient at its start, then each layer's workspace (an
    emulated GEMM's quantized, cast and dequantized operands, a convolution's unfolded rows read
    again and their fp32 gradient, the input gradient it returns) less the activations freed by
    then."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    kept = [p.grad for p in params]

    def drop(param):
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop) for p in params]
    try:
        for p in params:
            p.grad = None
        torch.autograd.backward(loss, inputs=params)
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, kept, strict=True):
            p.grad = grad


class _SaveInputs(torch.autograd.Function):
    """Saves its tensors for the backward and returns an empty tensor: what a non-reentrant
    checkpoint does with its block's positional inputs, so a pack hook sees them."""

    @staticmethod
    def forward(ctx, anchor, *tensors):
        ctx.save_for_backward(*tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, grad):
        return (None,) * (1 + len(ctx.saved_tensors))


@contextlib.contextmanager
def checkpointed_peak(model: torch.nn.Module):
    """A context in which `measure_activations` counts the peak of a model with activation
    checkpointing (transformers' ``gradient_checkpointing`` blocks), not only what its forward
    keeps: the last checkpointed block runs without its checkpoint, so the forward saves every
    block's input and that block's own tensors, which is what the run holds when its backward
    recomputes that block (the estimator's model, `lowbit.memory.estimate`). That block's
    inputs are still saved as its checkpoint saves them (the checkpoint keeps them for the
    recompute; BERT's blocks save none of their own: a cast of the hidden states is what their
    first layers keep). Without checkpointed blocks it changes nothing."""
    blocks = [
        module
        for module in model.modules()
        if module is not model and getattr(module, "gradient_checkpointing", False) is True
    ]
    if not blocks:
        yield
        return
    anchor = torch.empty(0, requires_grad=True)  # the saved tensors need a graph to join
    # the nodes that hold the inputs, kept to the context's end as the checkpoint keeps them to
    # the backward: freed at once, an input's memory could be taken by a later saved tensor of
    # the same size, which `measure_activations` (keyed by storage) would then not count
    holders: list = []

    def save_inputs(module, args):
        if torch.is_grad_enabled():
            holders.append(_SaveInputs.apply(anchor, *(t for t in args if torch.is_tensor(t))))

    blocks[-1].gradient_checkpointing = False
    handle = blocks[-1].register_forward_pre_hook(save_inputs)
    try:
        yield
    finally:
        handle.remove()
        holders.clear()
        blocks[-1].gradient_checkpointing = True


# what torch's C++ writes to file descriptor 2 while a profiler records, not the user's: kineto's
# line as a profiler starts and stops (`USDT: ... profiler_start`, torch 2.13; no setting turns it
# off), and the CPU allocator's warning on freeing a block made before the records began
_PROFILER_LINES = re.compile(
    rb"USDT:.*\] profiler_(start|stop)|\[W.*\] Memory block of unknown size was allocated before "
    rb"the profiling started"
)


@contextlib.contextmanager
def _profiler_lines_dropped():
    """Within: the process's file descriptor 2 goes to a temporary file; after, what was written
    to it is written back, in order, less torch's profiler and allocator lines (`_PROFILER_LINES`),
    which `lowbit train`'s memory report (`measure_activations`' backward) printed among its own.
    Held only while a profiler starts or stops (`Allocations`): a process that dies inside the
    window loses what it wrote there, a fatal error's message too. Nothing is done where the
    process has no stderr (``2>&-``: ``sys.stderr`` None, or no descriptor 2)."""
    if sys.stderr is None:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # descriptor 2 closed
        yield
        return
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                kept = memoryview(b"".join(x for x in held if not _PROFILER_LINES.match(x)))
                while kept:  # os.write may write part of it
                    kept = kept[os.write(2, kept) :]
    finally:
        os.close(saved)


class Allocations:
    """Within: every allocation and free of the CPU allocator on this thread, recorded
    (``torch.profiler`` with ``profile_memory=True``: kineto's signed ``[memory]`` events), and
    the moments `mark` names; after: `rise`, the most bytes allocated between two marks above
    those live at the first. A CPU has no ``torch.cuda.max_memory_allocated``; add the bytes live
    at the first mark (`measure`'s model states between steps) for the peak. It counts from a
    mark because frees on other threads are not recorded: in some 1-rank gloo DDP runs a
    gradient-sized buffer of the first step was freed off this thread, and the live bytes from
    the start read one gradient copy high ever after. docs/memory.md's DDP peaks
    (`benchmarks/ddp_peak.py`) are such."""

    def __enter__(self) -> Allocations:
        from torch.profiler import ProfilerActivity, profile

        self._labels: set[str] = set()
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        # The allocator warns, once a process, where a block made before the records began is
        # freed within them (a C++ line on stderr, amid the run's output): a block is freed
        # here, as the records start, so that line comes while stderr is held, and the window
        # itself keeps the real stderr (a crash in it still says why).
        made_before = torch.empty(1)
        with _profiler_lines_dropped():
            self._profile.__enter__()
            del made_before
        return self

    def mark(self, label: str) -> None:
        """Note this moment as ``label``, on the profiler's clock."""
        self._labels.add(label)
        with torch.profiler.record_function(label):
            pass

    def __exit__(self, *exc) -> None:
        with _profiler_lines_dropped():
            self._profile.__exit__(*exc)
        self.events, self.marks = [], {}
        for e in self._profile.profiler.kineto_results.events():
            if e.name() == "[memory]":
                self.events.append((e.start_ns(), e.nbytes()))
            elif e.name() in self._labels:
                self.marks.setdefault(e.name(), []).append(e.start_ns())
        self.events.sort()
        for stamps in self.marks.values():
            stamps.sort()

    def rise(self, start: int, end: int) -> int:
        """The most bytes live from ``start`` to ``end`` (stamps of `marks`) above those live at
        ``start`` (0 where nothing more was)."""
        live = peak = 0
        for stamp, nbytes in self.events:
            if start <= stamp < end:
                live += nbytes
                peak = max(peak, live)
        return peak
