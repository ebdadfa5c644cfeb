"""`lowbit compare`: train the same task once per recipe (and seed), then report the differences."""

from __future__ import annotations

import argparse
import signal
import sys

from lowbit.commands import train as train_command
from lowbit.errors import RunNotWritten, UsageError, interrupted_line

NAME = "compare"
HELP = (
    "Train the same task, model, data order and seeds once per recipe and write a report "
    "(report.md, report.html, results.json, plots): loss gap to the baseline with a verdict, task "
    "metric, speed, memory by component, per-label accuracy change. Finished runs are reused."
)
# `--fail-on-miss`'s exit status when a recipe misses its target: not 1 (an error), 2 (a usage
# error) nor 130 (interrupted), so that a CI script can tell a finished study that missed from one
# that did not finish.
MISSED = 3
# Train flags that compare sets itself (one run folder and one seed per run; every run is one
# process, trained in this one, so no multi-process flags).
OWN = {"--recipe", "--out", "--seed", "--nproc", "--strategy"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipes",
        required=True,
        help="comma-separated recipe names, e.g. fp32,bf16-mixed,fp8-tensorwise,mxfp4",
    )
    parser.add_argument("--baseline", help="the recipe to compare against (default: the first)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default 3)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds are N, N+1, ... (default 0)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        help="allowed final validation loss gap to the baseline, percent (default 1.0), for "
        "recipes without a parity target or --target",
    )
    parser.add_argument(
        "--target",
        action="append",
        metavar="RECIPE=PCT",
        help="a recipe's own tolerance in percent (repeatable)",
    )
    parser.add_argument(
        "--no-parity-targets",
        action="store_true",
        help="use --tolerance for every recipe instead of the parity targets (fp32 baseline)",
    )
    parser.add_argument(
        "--out",
        help="compare folder (default runs/compare-<task>-<model>, a --model folder named with "
        "its parent's name: RUN/model -> runs/compare-causal-lm-RUN-model); reruns reuse it",
    )
    parser.add_argument("--overwrite", action="store_true", help="retrain every run in --out")
    parser.add_argument(
        "--fail-on-miss",
        action="store_true",
        help=f"exit with status {MISSED} (after writing the report) when a recipe is not shown to "
        "meet its target: FAIL, INCONCLUSIVE (the seeds cannot tell: not a demonstrated pass), "
        "no verdict (its runs or the baseline's diverged or never updated the weights); "
        "PASS (unresolved) passes. Without it the exit status is 0 whatever the verdicts",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: PyTorch's; 1 is faster for tiny models on a busy "
        "machine)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at a time, each in its own process (default 1); with --jobs N each "
        "gets --threads threads, by default the CPU cores divided by N, or by the study's runs "
        "where fewer (the runs then share the cores: the report's throughput is under that "
        "load); finished runs are reused without starting a worker",
    )
    group = parser.add_argument_group("train options (passed to every run)")
    group.add_argument(
        "--config", metavar="FILE", help="YAML, TOML or JSON settings; flags override"
    )
    for flag, kind, text in train_command.FLAGS:
        if flag not in OWN:
            group.add_argument(flag, type=kind, default=None, help=text)
    train_command.add_switches(group)
    for flag in ("--nproc", "--strategy"):  # refused in one line, not as unrecognized arguments
        group.add_argument(flag, action=_OneProcess, help=argparse.SUPPRESS)
    group.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="PATTERN=WHAT",
        help="per-layer precision for every recipe's runs, repeatable, as `lowbit train "
        "--override` takes it (e.g. 'lm_head=fp32'); first match wins",
    )


class _OneProcess(argparse.Action):
    """Refuse ``--nproc`` and ``--strategy`` as a --config file's nproc and strategy are refused
    (`make_study`): they were argparse's bare "unrecognized arguments"."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from lowbit.report.compare import ONE_PROCESS

        raise UsageError(f"{option_string} {values}: {ONE_PROCESS}; fix: drop {option_string}")


def run(args) -> int:
    from lowbit.distributed.context import signals_handled
    from lowbit.report import compare, make_study
    from lowbit.report.compare import InterruptedBeforeRuns, parse_targets
    from lowbit.report.markdown import speed_load_note, verdict_lines
    from lowbit.report.parallel import raise_interrupt
    from lowbit.train import NonFiniteLoss
    from lowbit.train.config import build_config, load_file

    overrides = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag, *_ in train_command.FLAGS + train_command.SWITCHES
        if flag not in OWN
    }
    overrides["overrides"] = args.override
    # a flag replaces the file's setting: a mistyped one there is warned of, not refused; so are
    # the recipe, seed and folder, which the study sets
    given = {name: None for name, value in overrides.items() if value is not None}
    given |= {"recipe": "--recipes", "seed": "--first-seed", "out": "--out"}
    settings = load_file(args.config, given, ("lowbit compare", args)) if args.config else {}
    # a `lowbit train` config file names one run's; a study sets every run's itself
    ignored = [key for key in ("recipe", "seed", "out") if key in settings]
    if ignored:
        print(
            f"lowbit: warning: {args.config}: {', '.join(ignored)} ignored: a study sets each run's "
            "recipe, seed and folder (--recipes, --first-seed and --seeds, --out)",
            file=sys.stderr,
        )
    base = build_config(settings, overrides)
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(
                f"--threads must be positive, got {args.threads}; fix: --threads 1, or leave it "
                "out for PyTorch's default"
            )
        import torch

        torch.set_num_threads(args.threads)
    if args.seeds <= 0:
        raise UsageError(f"--seeds must be positive, got {args.seeds}; fix: --seeds 3")
    if args.jobs <= 0:
        raise UsageError(f"--jobs must be positive, got {args.jobs}; fix: --jobs 2")
    study = make_study(
        args.recipes,
        base,
        seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
        baseline=args.baseline,
        out=args.out,
        tolerance=1.0 if args.tolerance is None else args.tolerance,
        targets=parse_targets(args.target),
        parity_targets=not args.no_parity_targets,
    )
    judged = [name for name in study.recipes if name != study.baseline]
    if args.fail_on_miss and not judged:  # a gate that judged nothing would pass every time
        raise UsageError(
            f"--fail-on-miss with only the baseline ({study.baseline}) in --recipes judges no "
            "recipe; fix: add the recipes to judge to --recipes, or leave out --fail-on-miss"
        )
    if (
        args.tolerance is not None
        and judged
        and all(study.target(name).source != "--tolerance" for name in judged)
    ):  # e.g. fp32 against fp8 recipes, each held to its parity target instead
        print(
            f"lowbit: warning: --tolerance {args.tolerance:g} ignored: every recipe has its own "
            "target (a parity target against the fp32 baseline, docs/parity.md, or --target); "
            "fix: --no-parity-targets to judge them by --tolerance, or --target RECIPE=PCT",
            file=sys.stderr,
        )
    try:
        # a SIGINT raises KeyboardInterrupt even where this process was started with it ignored
        # (``lowbit compare ... &`` in a shell script), as in `lowbit train`: a `kill -INT` was
        # lost between runs (and, with --jobs, altogether: the study trained to the end)
        with signals_handled(raise_interrupt, signal.SIGINT):
            result = compare(
                study,
                overwrite=args.overwrite,
                quiet=args.quiet,
                plots=not args.no_plots,
                log=lambda line: print(line, flush=True),
                jobs=args.jobs,
                threads=args.threads,
            )
    except NonFiniteLoss as error:
        print(f"lowbit: error: {error}", file=sys.stderr)
        return 1
    except InterruptedBeforeRuns as error:  # no run trained, none of the earlier study's cleared
        done = "before any run trained" if error.written else "before the study changed anything"
        print(
            f"{interrupted_line(error)} {done}; run the same command again (out {study.out})",
            file=sys.stderr,
        )
        return 130
    except (KeyboardInterrupt, RunNotWritten) as error:
        # --overwrite again would retrain the runs this invocation finished, and the one it stopped
        again = " without --overwrite" if args.overwrite else ""
        again = f"run the same command again{again} to resume (out {study.out})"
        if isinstance(error, RunNotWritten):  # from this process or from a --jobs worker
            # the run's own fix (`lowbit train` of the one run) would finish it outside the study
            print(f"lowbit: error: {error.going_on_by(again)}", file=sys.stderr)
            return 1
        print(f"{interrupted_line(error)}; {again}", file=sys.stderr)
        return 130
    print(f"\nbaseline {study.baseline}; verdicts:")
    for line in verdict_lines(result.results):
        print(f"  {line}")
    note = speed_load_note(result.results)
    if note:
        print(f"speed: {note}")
    print(f"report: {result.report_dir / 'report.md'} (and report.html, results.json)")
    missed = missed_recipes(result.results) if args.fail_on_miss else []
    if missed:
        print(
            f"lowbit: --fail-on-miss: not shown to meet the target (exit status {MISSED}): "
            + "; ".join(missed),
            file=sys.stderr,
        )
        return MISSED
    return 0


def missed_recipes(results: dict) -> list[str]:
    """``recipe (how)`` for each recipe not shown to meet its target (``meets_target`` False:
    FAIL, MISSES the expectation, a baseline that diverged; None: INCONCLUSIVE, no verdict), how
    being its verdict without the figures (report.md has them) or the fix."""
    return [
        f"{name} ({row['verdict'].split(' (gap ')[0].split('; fix:')[0]})"
        for name, row in results["recipes"].items()
        if row["meets_target"] is not True
    ]
