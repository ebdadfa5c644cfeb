"""An interrupted run resumes and finishes with exactly the losses and tensors of an
uninterrupted one: a matrix of the cells most likely to break (loss scaling mid-growth-interval,
stochastic rounding, amax histories, Hadamard + SR, quantized optimizer states, dropout, grad
accumulation, an epoch cut in the middle, intervals that do not divide each other, --keep-last 1).

The stop is a first Ctrl-C's (`stop_requested`, what the SIGINT handler sets) after step ``stop``;
the comparison is bitwise, NaN-aware, and covers every tensor of the final checkpoint (model,
optimizer, precision, data position, RNG) and every record of metrics.jsonl but the timings.
"""

import json

import numpy as np
import pytest
import torch

from lowbit.train import checkpoint as ckpt
from lowbit.train import train

CELLS = {
    "lm-fp16-mid-growth": (
        "causal-lm",
        dict(recipe="fp16-mixed", steps=6, eval_interval=2, loss_scale_growth_interval=4),
        3,
    ),
    "lm-bf16-pure-sr-8bit": (
        "causal-lm",
        dict(recipe="bf16-pure-sr", optimizer_state="8bit", steps=6, eval_interval=2),
        3,
    ),
    "lm-fp8-delayed-stop-off-save": (
        "causal-lm",
        dict(recipe="fp8-delayed", steps=7, eval_interval=3, save_interval=2, keep_last=1),
        5,
    ),
    "tagger-mxfp4-dropout-keep-last-1": (
        "token-classification",
        dict(
            recipe="mxfp4",
            optimizer_state="fp8",
            steps=6,
            eval_interval=4,
            save_interval=3,
            keep_last=1,
        ),
        4,
    ),
    "digits-mid-epoch": (
        "image-classification",
        dict(recipe="bf16-pure-kahan", epochs=1.5, eval_interval=50, save_interval=30),
        7,
    ),
    "digits-accum-fp16": (
        "image-classification",
        dict(recipe="fp16-mixed", grad_accum=2, steps=6, eval_interval=4, save_interval=5),
        3,
    ),
    "digits-auto-4bit": (
        "image-classification",
        dict(recipe="auto", optimizer_state="4bit", steps=6, eval_interval=4),
        2,
    ),
}


def records(run) -> list[dict]:
    """metrics.jsonl less what depends on the clock."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if not k.endswith("_per_s") and k != "time"})
    return out


def leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix}/{i}")
    else:
        yield prefix, obj


def same_bits(x, y) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor:  # quantized optimizer states
        names, meta = x.__tensor_flatten__()
        other_names, other_meta = y.__tensor_flatten__()
        return (names, str(meta)) == (other_names, str(other_meta)) and all(
            same_bits(getattr(x, n), getattr(y, n)) for n in names
        )
    if isinstance(x, torch.Tensor):
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            return False
        if x.dtype == torch.bool:
            return torch.equal(x, y)
        as_bytes = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (x, y)]
        return torch.equal(*as_bytes)
    if isinstance(x, np.ndarray):  # numpy's RNG state
        return np.array_equal(x, y)
    return x == y or (x != x and y != y)  # NaN == NaN here


def differences(a: dict, b: dict) -> list[str]:
    left, right = dict(leaves(a)), dict(leaves(b))
    # Python's `random` is read by no training step, but something outside lowbit draws from it
    # once per process (its caches warm, an in-process resume skips the draw): its state is left
    # out, the torch and numpy generators that training reads are compared
    ignored = ("/config/out", "/trainer/step_seconds")
    keys = {k for k in left.keys() | right.keys() if not k.startswith("/rng/python")}
    keys -= set(ignored)
    return sorted(
        k for k in keys if k not in left or k not in right or not same_bits(left[k], right[k])
    )


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_an_interrupted_run_resumes_bit_identically(tiny_config, tmp_path, cell):
    task, settings, stop = CELLS[cell]
    settings = {k: v for k, v in settings.items() if k != "stop_"}
    if task == "image-classification":
        settings.setdefault("batch_size", 8 if "steps" in settings else 32)
    straight = train(tiny_config(task, **settings, out=str(tmp_path / "a")), quiet=True)

    def halt(trainer):
        if trainer.step_idx == stop:
            trainer.stop_requested = True

    config = tiny_config(task, **settings, out=str(tmp_path / "b"))
    assert train(config, quiet=True, on_step=halt).status == "interrupted"
    resumed = train(config, resume=True, quiet=True)
    assert (resumed.status, resumed.steps) == ("completed", straight.steps)
    assert records(tmp_path / "b") == records(tmp_path / "a")
    final = [ckpt.load(ckpt.latest(tmp_path / run)) for run in "ab"]
    assert differences(*final) == []
