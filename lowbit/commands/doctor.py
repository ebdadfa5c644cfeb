"""`lowbit doctor`: probe a recipe for a few steps and rank what loses precision, with fixes."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

NAME = "doctor"
HELP = (
    "Probe a recipe for a few training steps (or from a run's checkpoint) and print a ranked "
    "per-layer table of the operands that lose most (saturation, underflow, low SQNR), the "
    "failure patterns seen, and --override suggestions; writes doctor.json and doctor.png."
)


# Train flags that mean something else to a probe than to a run.
OWN_HELP = {
    "--steps": "length of the training run the probe is the start of: it sets the learning-rate "
    "schedule (warm-up, decay); the probe itself observes --probe-steps steps",
    "--epochs": "the run's length in passes over the data (sets the schedule, as --steps)",
    "--nproc": "the run's processes: the probe runs in one, on the global batch --batch-size",
    "--strategy": "the run's ddp or fsdp: the probe runs in one process, on the global batch",
}
DEFAULT_PROBE_STEPS = 8
# Train flags a copied command line may carry that the probe has no use for: it saves no
# checkpoint, runs no validation and logs nothing (--nproc/--strategy: `_one_process`).
UNUSED = ("--save-interval", "--keep-last", "--eval-interval", "--eval-batches", "--wandb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lowbit.commands.train import FLAGS, add_switches

    parser.add_argument(
        "--config", metavar="FILE", help="YAML, TOML or JSON settings; flags override"
    )
    for flag, kind, text in FLAGS:
        if flag != "--out":
            parser.add_argument(flag, type=kind, default=None, help=OWN_HELP.get(flag, text))
    add_switches(parser)  # accepted as `lowbit train` takes them (a copied command line)
    parser.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="PATTERN=WHAT",
        help="probe the recipe with these overrides (repeatable), e.g. to check a suggestion",
    )
    parser.add_argument(
        "--probe-steps",
        type=int,
        default=None,
        help=f"observed training steps (default {DEFAULT_PROBE_STEPS})",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="RUN_DIR",
        help="start the probe from this run's latest checkpoint, or from this checkpoint of a "
        "run (RUN/checkpoints/step-N.pt or .dcp): its settings, --recipe's numerics",
    )
    parser.add_argument(
        "--top", type=int, default=15, help="rows of the table to print (default 15)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where doctor.json/png go (default runs/doctor-R, or runs/doctor-R-2, ... where "
        "an earlier report is)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the report already in --out"
    )
    parser.add_argument("--wandb", action="store_true", default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    from lowbit.errors import warnings_held

    # the notes and warnings of the settings wait until the probe is set up: a refused doctor
    # (a bad --top, an --override that applies to no layer, a checkpoint of another model)
    # prints its one-line error alone
    with warnings_held():
        return _run(args)


def _run(args) -> int:
    from lowbit.errors import UsageError, check_given, note_later, warn
    from lowbit.infer.io import is_inference_dir, training_run
    from lowbit.train import checkpoint
    from lowbit.train.checkpoint import run_of
    from lowbit.train.config import build_config, load_file, read, with_recorded_data

    # an unset shell variable: "" is the current folder, probed as a run or left for the default
    check_given(args.checkpoint, "--checkpoint", "give a run folder or one of its checkpoints")
    check_given(args.out, "--out", "give a folder, or drop --out for the default")
    if args.probe_steps is None:
        args.probe_steps = DEFAULT_PROBE_STEPS
        if args.steps is not None or args.epochs is not None:
            length = "--steps" if args.steps is not None else "--epochs"
            note_later(
                f"{length} sets the schedule of the run being probed; the probe observes "
                f"{DEFAULT_PROBE_STEPS} steps of it (--probe-steps N for more)"
            )
    checkpoint_path = None
    if args.checkpoint and (run := run_of(args.checkpoint)):
        # one of a run's checkpoints (an earlier one than its latest, say): that run, from it
        checkpoint_path, args.checkpoint = Path(args.checkpoint), str(run)
    elif args.checkpoint:
        _refuse_missing_checkpoint(Path(args.checkpoint))
    if args.probe_steps < 1:
        raise UsageError(
            f"--probe-steps must be positive, got {args.probe_steps}; fix: e.g. --probe-steps "
            f"{DEFAULT_PROBE_STEPS}"
        )
    if args.top < 1:
        raise UsageError(f"--top must be positive, got {args.top}; fix: e.g. --top 15")
    if args.checkpoint and is_inference_dir(args.checkpoint):  # it holds no training state
        run = shlex.quote(str(training_run(args.checkpoint)))
        raise UsageError(
            f"{args.checkpoint}: a quantized or pruned model, which holds no training state to "
            f"probe; fix: --checkpoint {run} (the run it was made from)"
        )
    from lowbit.commands.train import FLAGS, SWITCHES

    flags = {
        f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_"))
        for f, *_ in FLAGS + SWITCHES
        if f != "--out"
    }
    flags["overrides"] = args.override
    # a run's settings, its relative --data path as the run resolved it (from any folder)
    base = (
        with_recorded_data(args.checkpoint, read(args.checkpoint)).to_dict()
        if args.checkpoint
        else {}
    )
    if args.checkpoint:  # a run folder (`read`): one stopped before its first save is refused
        # before the set-up (seconds to minutes), where it was "no saved tokenizer; fix: restore
        # the run's tokenizer folder"
        checkpoint.find(args.checkpoint, checkpoint_path, note=False)
    settings = {}
    if args.config:
        # a flag replaces the file's setting: a mistyped one there is warned of, not refused
        given = {k for k, v in flags.items() if v is not None}
        settings = load_file(args.config, given, ("lowbit doctor", args))
        base.update(settings)
    config = build_config(base, flags)
    out, held, made = _report_folder(args.out, config.recipe, args.overwrite)
    if "out" in settings and args.out is None:  # a `lowbit train` file's: the run's folder
        warn(
            f"{args.config}: out ignored: it names the folder of the run, not of the doctor's "
            f"report, which goes to {out} (--out DIR to choose)"
        )
    try:
        return _probe(args, config, out, checkpoint_path)
    finally:
        _let_go(held, made)


def _probe(args, config, out: Path, checkpoint_path: Path | None) -> int:
    """Probe ``config`` and write the report into ``out`` (held by this doctor)."""
    from dataclasses import replace

    from lowbit.diagnostics.doctor import diagnose, write_outputs
    from lowbit.errors import warn
    from lowbit.train.config import resolve

    unused = [flag for flag in UNUSED if getattr(args, flag[2:].replace("-", "_")) is not None]
    if unused:  # held until the probe is set up (`warnings_held`)
        warn(
            f"{', '.join(unused)} ignored: the probe saves no checkpoint, runs no validation "
            "and logs nothing"
        )
    # the probe's own scratch run folder (never the checkpoint's run)
    config = _one_process(resolve(replace(config, out=str(out / "probe"), wandb=False)))
    diagnosis = diagnose(
        config,
        steps=args.probe_steps,
        checkpoint_dir=args.checkpoint,
        checkpoint_path=checkpoint_path,
    )
    print(diagnosis.table(top=args.top))
    if args.checkpoint:
        from lowbit.diagnostics.auto import moves_after_first_plan, plan_over_time

        timeline = plan_over_time(args.checkpoint, until_step=diagnosis.start_step)
        if timeline:
            print(f"auto plan of {args.checkpoint} over time:\n{timeline}")
        moves = moves_after_first_plan(args.checkpoint, until_step=diagnosis.start_step)
        if moves:
            print(moves)
    json_path, png_path = write_outputs(diagnosis, out)
    print(f"wrote {json_path} and {png_path}")
    return 130 if diagnosis.interrupted else 0  # as `lowbit train` interrupted


def _report_folder(
    out: str | None, recipe: str, overwrite: bool
) -> tuple[Path, int | None, list[Path]]:
    """Where the report goes, the descriptor of this doctor's lock on it (`_hold`), and the
    folders made for it (`_let_go` removes them where the probe never started): ``--out``, or
    ``runs/doctor-RECIPE``. An earlier report there was replaced without a word (the probe before
    a fix, when the fix was checked); as `lowbit train` treats a run in its --out, an ``--out``
    that holds one is refused without ``--overwrite``, and the default goes on to a fresh
    ``runs/doctor-RECIPE-2``, ``-3``, ...; so it does past a folder another doctor holds."""
    default = Path("runs") / f"doctor-{recipe.replace(':', '-')}"
    folder, n = (default if out is None else Path(out)), 1
    while True:
        made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
        held = _hold(folder, overwrite, explicit=out is not None)  # False: not for an --out
        if held is not False:
            return folder, held, made
        n += 1
        folder = default.with_name(f"{default.name}-{n}")


def _hold(folder: Path, overwrite: bool, explicit: bool) -> int | bool | None:
    """Make ``folder`` and lock it (`lock_folder`) for this doctor's report: the descriptor, None
    where locks cannot be had (NFS; not POSIX), or False, for the default to go on to the next
    folder, where it holds an earlier report (without ``--overwrite``) or another doctor holds it.
    Two doctors started together both wrote into the same folder, and trained in its probe/, one
    report lost. An explicit ``--out`` is refused instead, as is a folder no report can go in,
    before the probe (minutes of training) rather than when the results are written."""
    from lowbit.diagnostics.doctor import OUTPUT_FILES
    from lowbit.errors import UsageError, check_writable, file_in_the_way
    from lowbit.folder_lock import lock_folder
    from lowbit.train.config import RUN_INFO
    from lowbit.train.runstate import busy_error

    def earlier_report() -> bool:
        found = [name for name in OUTPUT_FILES if (folder / name).is_file()]
        if found and explicit and not overwrite:
            raise UsageError(
                f"{folder}: holds an earlier doctor report ({', '.join(found)}); fix: "
                "--overwrite to replace it, or another --out"
            )
        return bool(found) and not overwrite

    if earlier_report():
        return False
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise UsageError(f"{blocking}: exists and is not a folder; fix: choose another --out")
    # a folder where a report file goes failed when the results were written, after the probe
    for name in OUTPUT_FILES:
        if (folder / name).is_dir():
            raise UsageError(
                f"{folder / name}: a folder where the doctor writes its {name}; fix: choose "
                "another --out, or move that folder"
            )
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held = lock_folder(folder)
    if held is False and explicit:
        if (folder / RUN_INFO).is_file():  # a run trains there: `lowbit train`'s refusal
            raise busy_error(folder)
        raise UsageError(
            f"{folder}: another lowbit doctor is writing its report into this folder; fix: wait "
            "until it ends (or stop it), or choose another --out"
        )
    if held is None or held is False:
        return held
    try:  # a report written by a doctor that ended since it was looked for
        late = earlier_report()
    except UsageError:
        os.close(held)
        raise
    if late:
        os.close(held)
        return False
    return held


def _let_go(held: int | None, made: list[Path]) -> None:
    """Drop this doctor's lock on its report's folder (`_hold`), and remove the folders made for
    it that stayed empty (a refusal of the settings before the probe started), as before they
    were made when the folder was picked."""
    if held is not None:
        os.close(held)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty: the report, the probe's files, another doctor's folder
            break


def _refuse_missing_checkpoint(path: Path) -> None:
    """Refuse a checkpoint path of a run that has no such checkpoint (``step-2.pt`` for
    ``step-0000002.pt``), naming the ones it has: read as a run folder instead, it was refused
    as "no such run folder (no config.yaml)", the run's folder two levels up unnamed. So is a
    file or folder of a run that is no checkpoint (its config.yaml, its checkpoints folder),
    which read "RUN/config.yaml: no config.yaml, not a lowbit run folder"."""
    from lowbit.errors import UsageError
    from lowbit.train.checkpoint import FOLDER, list_checkpoints

    run = path.parent
    inside = path.exists() and not (path / "config.yaml").is_file()  # not a run folder itself
    if inside and (run / "config.yaml").is_file():
        what = "file" if path.is_file() else "folder"
        have = ", ".join(p.name for p in list_checkpoints(run)) or "none yet"
        raise UsageError(
            f"{path}: a {what} of the run {run}, not a checkpoint; fix: --checkpoint "
            f"{shlex.quote(str(run))} for its latest, or one in {run / FOLDER} ({have})"
        )
    run = path.parent.parent
    if path.parent.name != FOLDER or not (run / "config.yaml").is_file():
        return
    have = list_checkpoints(run)
    # a path that is there but no checkpoint (a step folder without .dcp, a file of another kind)
    what = "not a lowbit checkpoint" if path.exists() else "no such checkpoint"
    if not have:
        raise UsageError(f"{path}: {what}, and {run} has none yet; fix: train first")
    # the step the name meant, in the run's spelling of it
    step = re.fullmatch(r"\D*0*(\d+)\D*", path.name)
    meant = [p for p in have if step and re.fullmatch(rf"step-0*{step[1]}\.\w+", p.name)]
    fix = f"--checkpoint {shlex.quote(str(meant[0]))}" if meant else "one of them"
    raise UsageError(
        f"{path}: {what} ({run} has {', '.join(p.name for p in have)}); fix: {fix}, "
        f"or --checkpoint {shlex.quote(str(run))} for its latest"
    )


def _one_process(config):
    """The probe runs in this process: a multi-process run's settings (``--nproc``, ``--strategy``,
    given or the checkpointed run's) were probed so without a word. A step of N ranks is one
    process's step on the global batch, with the scales one process computes (docs/distributed.md),
    so the probe's statistics are the run's but for FSDP's bf16 all-gather of the weights (one
    rounding more before fp8/MX quantize them); and the memory check is of this one process."""
    from dataclasses import replace

    from lowbit.errors import note_later

    if config.strategy is None:
        return config
    gather = ", but for FSDP's bf16 rounding of the gathered weights" * (config.strategy == "fsdp")
    note_later(
        f"the probe runs in one process, not --nproc {config.nproc} --strategy "
        f"{config.strategy}: on the global batch of {config.batch_size}, as the ranks compute it "
        f"together with the same scales{gather} (docs/distributed.md)"
    )
    return replace(config, nproc=1, strategy=None)
