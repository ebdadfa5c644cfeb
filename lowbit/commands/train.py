"""`lowbit train`: train a model in a precision recipe, with checkpoints, tracking and progress."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lowbit.errors import Terminated, UsageError

NAME = "train"
HELP = (
    "Train a model (causal-lm, token-classification, image-classification) in a precision recipe. "
    "With no arguments: a tiny Llama on the Python stdlib in bf16-mixed, a few minutes on a CPU."
)

# flag -> (TrainConfig field, type, help); every default is None so that only given flags override
# the config file (or the saved config of a resumed run).
FLAGS = [
    ("--task", str, "causal-lm (default), token-classification or image-classification"),
    ("--model", str, "a named size (tiny, small, ...), 'minilm', or a local Hugging Face folder"),
    ("--recipe", str, "precision recipe (default bf16-mixed); `lowbit recipes` lists them"),
    (
        "--data",
        str,
        "a folder, glob, text, JSONL or .json file (causal-lm), or CoNLL file/folder",
    ),
    (
        "--text-field",
        str,
        "the JSON records' field that holds the text (default text; a.b: b in a)",
    ),
    ("--tokenizer", str, "byte (default) or bpe (trained on the train split)"),
    ("--vocab-size", int, "BPE vocabulary size (default 2048)"),
    ("--steps", int, "optimizer steps (task default; or use --epochs)"),
    ("--epochs", float, "passes over the training data instead of --steps"),
    ("--batch-size", int, "examples per micro-batch"),
    ("--seq-len", int, "tokens per example"),
    ("--lr", float, "peak learning rate"),
    ("--min-lr", float, "learning rate at the end of the cosine decay (default lr/10)"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--weight-decay", float, "AdamW weight decay of matrices"),
    ("--optimizer-state", str, "AdamW state precision: fp32 (default), bf16, fp8, 8bit, 4bit"),
    ("--grad-accum", int, "micro-batches per optimizer step (default 1)"),
    ("--grad-clip", float, "clip the gradient norm to this (default 1.0; 0 measures only)"),
    ("--loss-scale", float, "fp16 recipes: the starting loss scale (default 65536, GradScaler's)"),
    (
        "--loss-scale-growth-interval",
        int,
        "fp16 recipes: overflow-free steps before the loss scale doubles (default 2000)",
    ),
    ("--seed", int, "seed of initialization, data order and sampling (default 0)"),
    ("--eval-interval", int, "steps between validation evaluations"),
    ("--eval-batches", int, "validation batches per evaluation (default 8)"),
    ("--save-interval", int, "steps between checkpoints (default: the eval interval)"),
    ("--keep-last", int, "checkpoints to keep (default 2)"),
    (
        "--out",
        str,
        "run folder: checkpoints, metrics.jsonl, tensorboard/ (default "
        "runs/<task>-<recipe>-<timestamp>)",
    ),
    ("--device", str, "auto (default), cpu, cuda or cuda:N"),
    ("--nproc", int, "processes (ranks) on this machine; --batch-size is the global batch"),
    ("--strategy", str, "ddp (default with --nproc > 1) or fsdp; under torchrun: this rank's"),
]

# on/off flags, each with its --no- form: (flag, help); None unless given, so that a resumed
# run keeps its setting unless told otherwise
SWITCHES = [
    (
        "--activation-checkpointing",
        "recompute each transformer block's forward in the backward instead of keeping its "
        "activations: less memory, more compute, the same numbers (docs/memory.md)",
    ),
]


def add_switches(parser) -> None:
    """The `SWITCHES` as ``--flag`` / ``--no-flag`` options of ``parser`` (or an argument group),
    None unless given; `lowbit compare` and `lowbit doctor` take them too."""
    for flag, text in SWITCHES:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML, TOML or JSON settings, keyed by the flags' names (a run folder's config.yaml "
        "repeats its run); relative paths in it are from the working folder; flags override",
    )
    for flag, kind, text in FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    add_switches(parser)
    parser.add_argument(
        "--wandb",
        # with its --no- form: a config file's (or a resumed run's) `wandb: true` could not be
        # turned off from the command line, as flags override the file
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also log to Weights & Biases, offline, into RUN/wandb (if installed; a --resume "
        "goes on in the same W&B run)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (or --out) from its last checkpoint",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    add_diagnostics_arguments(parser)


def add_diagnostics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--override`` (repeatable) and ``--stats-interval`` (lowbit.diagnostics)."""
    from lowbit.diagnostics.stats import DEFAULT_INTERVAL

    parser.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="PATTERN=WHAT",
        help="per-layer precision, repeatable: PATTERN=keep|PRESET|OPERAND:FORMAT,... (e.g. "
        "'model.layers.3.mlp.down_proj=grad_weight.grad_out:bf16'); first match wins",
    )
    parser.add_argument(
        "--stats-interval",
        type=int,
        nargs="?",
        const=DEFAULT_INTERVAL,
        default=None,
        metavar="N",
        help="log numerics statistics of each layer the recipe converts, per operand (amax, "
        f"saturation, underflow, SQNR, scale) every N steps (default N {DEFAULT_INTERVAL}; off "
        "without the flag, or with 0: a --resume then logs none)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, validation lines or W&B lines (the summary and its sample still "
        "print)",
    )


def config_from_args(args):
    """The run's `TrainConfig`: saved config (resume) < config file < flags."""
    from lowbit.distributed.context import torchrun_env
    from lowbit.train.config import (
        build_config,
        given_settings,
        is_run_config,
        load_file,
        merge,
        read,
    )

    overrides = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag, *_ in FLAGS + SWITCHES
    }
    overrides["wandb"] = args.wandb
    overrides["stats_interval"] = getattr(args, "stats_interval", None)
    overrides["overrides"] = getattr(args, "override", None)
    if isinstance(args.resume, str):
        if args.out is not None and _path(args.out) != _path(args.resume):
            raise UsageError(f"--resume {args.resume} and --out {args.out} differ; fix: give one")
        overrides["out"] = args.resume
    _check_nproc(args.nproc)
    flags = {name for name, value in overrides.items() if value is not None}
    settings = load_file(_path(args.config), flags, ("lowbit train", args)) if args.config else {}
    if args.nproc is None and "nproc" in settings and not is_run_config(_path(args.config)):
        # a hand-written file's nproc was given; a run's config.yaml records the count that run
        # had, which follows torchrun's world size as an unset one does
        _check_nproc(build_config(settings).nproc, args.config)
    if args.resume:
        # the run folder: --resume DIR, else --out, else the config file's out (a job script that
        # runs `lowbit train --config run.yaml --resume` again after each preemption)
        out = build_config(settings, overrides).out
        if out is None:
            raise UsageError("--resume needs the run folder; fix: --resume RUN_DIR")
        recorded = given_settings(read(out))
        settings = merge(recorded, settings)
        # --eval-interval 0 is refused; this one stops the statistics a resumed run logged
        if overrides["stats_interval"] == 0 and recorded.get("stats_interval"):
            print(
                f"lowbit: note: --stats-interval 0 stops the numerics statistics this run logged "
                f"(--stats-interval {recorded['stats_interval']})",
                file=sys.stderr,
            )
    config = build_config(settings, overrides)
    if torchrun_env():  # what a run recorded follows the world size; a given count was checked
        config.nproc = int(os.environ["WORLD_SIZE"])
    if args.config:
        _check_file_values(config, overrides, args.config)
    return config


def _check_file_values(config, overrides: dict, path: str) -> None:
    """Refuse a value of the config file at ``path`` that `resolve` refuses (``recipe: fp7``,
    ``eval_interval: 0``) naming the file: the error named the setting only, and its fix a flag
    the user never gave. A refusal that the flags alone meet too is theirs, and left to `train`."""
    from lowbit.train.config import build_config, resolve

    try:
        resolve(config)
    except UsageError as error:
        try:
            resolve(build_config({}, overrides))
        except UsageError:
            return
        raise UsageError(f"{path}: {error}") from None


def _warn_stats_without_layers(config) -> None:
    """Warn of a ``--stats-interval`` of a recipe that converts no layer (fp32, bf16-mixed, the
    bf16 low and pure recipes: autocast or bf16 parameters), which has no layer to measure: the
    run logged no statistics without a word."""
    from lowbit.errors import warn
    from lowbit.train.config import recipe_of, resolve

    if not config.stats_interval:
        return
    recipe = recipe_of(resolve(config))  # a bad setting refused as `train` refuses it
    if recipe.layer is None and not recipe.overrides:
        warn(
            f"--stats-interval: recipe {config.recipe} converts no layer, so no numerics "
            "statistics are logged (they measure the layers a recipe converts); fix: a recipe "
            "with low-precision layers (lowbit recipes), or no --stats-interval"
        )


def _path(path: str) -> Path:
    """A path option's folder or file; a leading ``~`` is the home folder, as the shell expands it
    unquoted: quoted (``--config '~/run.yaml'``, or from a script) it named a folder ``~``."""
    return Path(os.path.expanduser(path))


def _check_nproc(nproc: int | None, config_file: str | None = None) -> None:
    """Under torchrun the run's processes are the ones torchrun started: a --nproc (or a
    ``config_file``'s nproc) of another number was replaced by torchrun's world size without a
    word."""
    from lowbit.distributed.context import torchrun_env

    world = int(os.environ["WORLD_SIZE"]) if torchrun_env() else None
    if nproc is None or world is None or nproc == world:
        return
    name, where = ("nproc", f"{config_file}: ") if config_file else ("--nproc", "")
    there = " there" if config_file else ""
    raise UsageError(
        f"{where}{name} {nproc}, but torchrun started {world} processes (WORLD_SIZE {world}); "
        f"fix: {name} {world}{there}, or drop {name} (under torchrun its processes are the run's)"
    )


def run(args) -> int:
    from lowbit.distributed import RankFailed
    from lowbit.train import NonFiniteLoss, train
    from lowbit.train.logging import WANDB_RUN_ID

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; fix: give one")
    config = config_from_args(args)
    _warn_stats_without_layers(config)
    from lowbit.train.runstate import checkpoints_present

    replaced = checkpoints_present(config.out) if args.overwrite else None  # `kept_text`
    try:
        result = train(config, resume=bool(args.resume), overwrite=args.overwrite, quiet=args.quiet)
    except (NonFiniteLoss, RankFailed) as error:
        from lowbit.cli import report_error

        report_error(f"lowbit: error: {error}")  # once, though every torchrun rank stops alike
        return 1
    except KeyboardInterrupt as error:
        from lowbit.train.runstate import kept_text

        how = "terminated (SIGTERM)" if isinstance(error, Terminated) else "aborted"
        print(f"lowbit: {how}; {kept_text(config.out, replaced)}", file=sys.stderr)
        return 130
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    from lowbit.train.generate import print_encodable

    print_encodable(result.summary())  # its closing sample may hold any character
    run_dir = shlex.quote(str(result.run_dir))  # the commands printed must paste into a shell
    if result.status == "interrupted":
        print(f"resume with: lowbit train --resume {run_dir}")
        return 130
    nexts = [f"lowbit eval {run_dir}", f"tensorboard --logdir {run_dir}"]
    if config.wandb and (Path(result.run_dir) / "wandb" / WANDB_RUN_ID).is_file():
        # W&B's own lines, cut to where it keeps the run, no longer end with this command
        nexts.append(f"wandb sync {run_dir}/wandb/offline-run-*")
    print(f"next: {'  |  '.join(nexts)}")
    return 0
