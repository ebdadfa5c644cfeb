"""How close fp16-low's gradients are to fp32's at initialization, with lowbit's rerouted CPU
attention (`lowbit.nn.attention`: fp32 flash kernels on fp16 operands) and with PyTorch's native
fp16 attention kernel (measured).

The parity study's causal-LM model (Llama size ``nano``, 128 x 64 tokens per batch, seed 0) is
built under fp32 and under fp16-low, the same initial weights; for each of ``--batches`` training
batches both compute gradients (fp16-low's unscaled by its loss scale), and the SQNR in dB of each
parameter's fp16-low gradient against fp32's is averaged over the parameters. The native arm is
the fp16-low model switched back to Transformers' ``sdpa`` attention. Reported per batch and
overall, for both arms. docs/parity.md quotes the result.

    .venv/bin/python benchmarks/fp16_attention_sqnr.py [--batches 3] [--threads 1]
"""

from __future__ import annotations

import statistics
import tempfile

import torch
from benchmarks_md import DefaultsFormatter, ScriptParser, at_least, run_script

from lowbit.formats.error import sqnr
from lowbit.train import TrainConfig
from lowbit.train.trainer import Trainer


def trainer(recipe: str) -> Trainer:
    config = TrainConfig(
        recipe=recipe,
        model="nano",
        batch_size=128,
        seq_len=64,
        device="cpu",
        steps=1,
        out=tempfile.mkdtemp(prefix="lowbit-fp16-attention-"),
    )
    return Trainer(config, quiet=True, warn_emulation=False)


def gradients(t: Trainer, batch) -> dict[str, torch.Tensor]:
    t.optimizer.zero_grad(set_to_none=True)
    with t.precision.autocast():
        loss, _ = t.task.loss(t.train_model, batch)
    t.precision.backward(loss)
    scale = float(t.precision.loss_scale)
    return {n: p.grad.float() / scale for n, p in t.model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    at_least(parser, args, 1, "batches", "threads")
    torch.set_num_threads(args.threads)
    reference, low = trainer("fp32"), trainer("fp16-low")
    arms = {"routed": [], "native": []}
    for i in range(args.batches):
        batch = next(reference.task.train_batches)
        exact = gradients(reference, batch)
        for arm in arms:
            low.model.set_attn_implementation("lowbit_sdpa" if arm == "routed" else "sdpa")
            approx = gradients(low, batch)
            mean = statistics.mean(sqnr(exact[name], approx[name]) for name in exact)
            arms[arm].append(mean)
            print(
                f"batch {i}: {arm} attention, mean SQNR over {len(exact)} parameters {mean:.2f} dB"
            )
    for arm, values in arms.items():
        print(
            f"{arm}: {min(values):.2f}-{max(values):.2f} dB over {args.batches} batches "
            f"(mean {statistics.mean(values):.2f})"
        )


if __name__ == "__main__":
    run_script(main)
