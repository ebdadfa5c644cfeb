"""Does `lowbit doctor` find what breaks a recipe, and do its overrides fix it? (measured)

The case: the tiny causal LM with activation outliers injected into the inputs of every
``mlp.down_proj`` (`lowbit.diagnostics.cases.inject_outliers`: two channels x ``--gain``, weight
columns / gain; the same function in exact arithmetic). The doctor probes ``--recipe`` for a few
steps; then three runs train the same case: bf16-mixed (the reference), the recipe, and the
recipe with the doctor's suggested overrides (parsed exactly as ``lowbit train --override``).
Reported: validation loss of each and the share of the recipe's gap to bf16 that the overrides
close.

    .venv/bin/python benchmarks/doctor_outliers.py [--recipe fp8-tensorwise] [--steps 150]
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks_md import DefaultsFormatter, ScriptParser, at_least, run_script

from lowbit.diagnostics.cases import inject_outliers
from lowbit.diagnostics.doctor import diagnose
from lowbit.train import TrainConfig
from lowbit.train.config import resolve
from lowbit.train.trainer import Trainer

PATTERN = "*.mlp.down_proj"


def run(config: TrainConfig, gain: float) -> float:
    trainer = Trainer(config, quiet=True)
    inject_outliers(trainer.model, PATTERN, gain=gain)
    trainer.sample = False
    return trainer.fit(overwrite=True).final_metrics["loss"]


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--recipe", default="fp8-tensorwise")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--gain", type=float, default=2.0**16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--probe-steps", type=int, default=4)
    args = parser.parse_args()
    # --steps 0 was refused as "eval_interval must be positive", a setting it has not
    at_least(parser, args, 1, "steps", "batch_size", "seq_len", "probe_steps")
    folder = Path(tempfile.mkdtemp(prefix="lowbit-doctor-"))
    base = TrainConfig(
        recipe=args.recipe,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_interval=args.steps,
        eval_batches=16,
        device="cpu",
        out=str(folder / "probe"),
    )
    diagnosis = diagnose(
        resolve(base),
        steps=args.probe_steps,
        prepare=lambda t: inject_outliers(t.model, PATTERN, gain=args.gain),
    )
    print(diagnosis.table(top=10), flush=True)
    losses = {}
    for name, config in (
        ("bf16-mixed", replace(base, recipe="bf16-mixed")),
        (args.recipe, base),
        (f"{args.recipe} + doctor overrides", replace(base, overrides=diagnosis.suggestions)),
    ):
        config = replace(config, out=str(folder / name.replace(" ", "_")))
        losses[name] = run(config, args.gain)
        print(f"{name}: validation loss {losses[name]:.4f}", flush=True)
    reference, broken, fixed = losses.values()
    closed = (broken - fixed) / (broken - reference) if broken != reference else float("nan")
    print(
        f"gap to bf16: {broken - reference:+.4f} -> {fixed - reference:+.4f} "
        f"({closed:.0%} of the gap closed)"
    )
    print(json.dumps({"losses": losses, "closed": closed, "suggestions": diagnosis.suggestions}))


if __name__ == "__main__":
    run_script(main)
