"""A DDP rank's peak against `lowbit estimate`'s: 2 gloo ranks (CPU), three training steps.

    python benchmarks/ddp_peak.py                             # tiny, bf16-mixed, 1 x 16 and 8 x 128
    python benchmarks/ddp_peak.py --model small --shapes 1x16,4x256

Each rank steps as `lowbit train --nproc 2 --strategy ddp` does (gradients zeroed and kept as
views of DDP's buckets) and records its CPU allocator (`lowbit.memory.measure.Allocations`):
for the second and third steps, the most bytes live before the model's forward (in the second
step DDP rebuilds its buckets there) and from the forward on, each the model states between
steps (`measure`) plus the allocator's rise above them. Printed beside the estimate's terms:
model states + the bucket rebuild, model states + activations + temporaries + the logits'
gradient, and the estimate's peak.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

STEPS = 3


def step_peaks(
    size: str, recipe: str, tokens: torch.Tensor, steps: int = STEPS, vocab: int = 257, ddp=True
) -> list:
    """In a gloo process group already up, ``steps`` training steps of ``size`` (of a ``vocab``
    vocabulary) under ``recipe`` on ``tokens``, wrapped as `lowbit train`'s DDP wraps it (or not:
    ``ddp=False``, one process without a group); the peak bytes, (before the forward, from it
    on), of each step from the second (the first starts without gradients' values or states),
    the batch left out: the bytes live at the phase's start plus the allocator's rise above them.

    Live at the start, with ``ddp=False``: everything allocated within the records and not freed
    (the model states, and what the previous backward leaves alive: its last shared quantization
    of a weight-gradient input, kept until the next forward starts, `lowbit.nn.operand`; until
    session 43 left out, so the peaks of `fp8-rowwise`, the MX recipes and `nvfp4` read ~2% low).
    Under DDP, where frees on other threads are not recorded (`Allocations`), the model states
    between steps (`measure`) plus the storages the shared quantization's slots hold at the end
    (`_slot_bytes`: the last backward's, of the same shapes as each earlier backward's)."""
    import lowbit
    from lowbit.distributed.ddp import wrap_ddp
    from lowbit.memory.measure import Allocations, measure
    from lowbit.models import build_causal_lm
    from lowbit.nn.operand import shared_quantization
    from lowbit.optim import build_optimizer

    for slot in list(shared_quantization.slots):  # an earlier run's, else freed in the records
        shared_quantization.release(slot)
    gc.collect()  # likewise an earlier model's cycles
    with Allocations() as allocations:
        precision = lowbit.Precision(recipe)
        model = precision.convert(build_causal_lm(size, vocab))
        wrapped = wrap_ddp(model, precision, torch.device("cpu"))[0] if ddp else model
        optimizer = precision.wrap_optimizer(build_optimizer(model.parameters()))
        model.register_forward_pre_hook(lambda *_: allocations.mark("forward"))
        for _ in range(steps):
            allocations.mark("step")
            with precision.autocast():
                logits = wrapped(tokens).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
            del logits
            precision.backward(loss)
            del loss
            precision.step(optimizer)
            optimizer.zero_grad(set_to_none=False)  # `Ranks.zero_grad` under DDP
        allocations.mark("step")
    # every phase measured starts after a backward, with its last shared quantization alive
    between = measure(model, optimizer, precision).model_states + _slot_bytes(shared_quantization)
    marks, forwards = allocations.marks["step"], allocations.marks["forward"]

    def live(stamp: int) -> int:
        if ddp:
            return between
        return sum(nbytes for made, nbytes in allocations.events if made < stamp)

    return [
        (
            live(marks[k]) + allocations.rise(marks[k], forwards[k]),
            live(forwards[k]) + allocations.rise(forwards[k], marks[k + 1]),
        )
        for k in range(1, steps)
    ]


def _slot_bytes(shared_quantization) -> int:
    """Bytes of the storages the shared quantization's slots hold (inputs and results), each once."""
    from lowbit.memory.measure import tensor_bytes

    return tensor_bytes(_tensors_in([value[1:3] for value in shared_quantization.slots.values()]))


def _tensors_in(held) -> list:
    """The tensors in ``held``: itself, or within its tuples, lists and dataclasses' fields (read
    from a `QTensor`'s ``__dict__``: its ``values`` property would recover values not written)."""
    if isinstance(held, torch.Tensor):
        return [held]
    if isinstance(held, (tuple, list)):
        return [t for item in held for t in _tensors_in(item)]
    if dataclasses.is_dataclass(held) and not isinstance(held, type):
        return _tensors_in(list(vars(held).values()))
    return []


def _rank(rank, world, port, folder, size, recipe, shape):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokens = torch.randint(0, 257, shape, generator=torch.Generator().manual_seed(rank))
    try:
        out = step_peaks(size, recipe, tokens)
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"{rank}.pkl").write_bytes(pickle.dumps(out))


def main() -> None:
    from benchmarks_md import ScriptParser

    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="a named model size, as lowbit train --model takes (nano, tiny, small, ...)",
    )
    parser.add_argument(
        "--recipe",
        default="bf16-mixed",
        help="a recipe, as lowbit train --recipe takes (lowbit recipes lists them)",
    )
    parser.add_argument("--shapes", default="1x16,8x128", help="batch x seq per rank, commas")
    args = parser.parse_args()
    from lowbit.distributed.context import free_port
    from lowbit.memory.estimate import estimate

    for text in args.shapes.split(","):
        batch, seq = (int(v) for v in text.split("x"))
        with tempfile.TemporaryDirectory() as folder:
            spawn = (2, free_port(), folder, args.model, args.recipe, (batch, seq))
            mp.spawn(_rank, args=spawn, nprocs=2)
            ranks = [pickle.loads((Path(folder) / f"{r}.pkl").read_bytes()) for r in range(2)]
        e = estimate(args.model, args.recipe, "fp32", batch, seq, gpus=2)
        print(f"{args.model} {args.recipe} batch {batch} x seq {seq} per rank, 2 gloo ranks")
        for r, phases in enumerate(ranks):
            cells = "; ".join(
                f"step {k}: {before:,} before the forward, {after:,} from it on"
                for k, (before, after) in enumerate(phases, start=2)
            )
            print(f"  rank {r}: {cells}")
        print(
            f"  estimate: model states + bucket rebuild {e.model_states + e.bucket_rebuild:,}; "
            f"model states + activations + temporaries + logits' gradient "
            f"{e.model_states + e.step_peak:,}; peak {e.total:,} (set by the {e.peak_set_by}); "
            f"session 39's sum "
            f"{e.model_states + e.bucket_rebuild + e.activations + e.temporaries:,}"
        )


if __name__ == "__main__":
    main()
