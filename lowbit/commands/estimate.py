"""`lowbit estimate`: training memory per device, by component, and which accelerators it fits."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.errors import UsageError, check_given, choose, say_held_notes
from lowbit.memory.breakdown import COMPONENTS, human
from lowbit.memory.estimate import (
    ACCELERATORS_GIB,
    NOT_CHECKPOINTABLE,
    RESERVE,
    SHARDING,
    SPLIT_STATE_BLOCKS,
    TASKS,
    check_count,
    estimate,
    fits,
    load_model_config,
)
from lowbit.models import list_sizes
from lowbit.models.causal_lm import config_positions, default_seq_len
from lowbit.optim import STATE_PRECISIONS
from lowbit.recipes import Recipe, get_recipe
from lowbit.recipes.presets import accepted_names
from lowbit.train.config import TASK_DEFAULTS

NAME = "estimate"
DEFAULT_SEQ = 1024
HELP = "Estimate training memory (parameters, gradients, master weights, states, activations)."


class _Spelled(argparse.Action):
    """Store the value, and which of the option's spellings the user typed (``--seq`` or
    ``--seq-len``, ``--gpus`` or ``--nproc``), for an error to name that flag (`_flag`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.spelled = {
            **(getattr(namespace, "spelled", None) or {}),
            self.dest: option_string,
        }


def _flag(args, dest: str) -> str:
    """The flag of setting ``dest`` as the user typed it (`_Spelled`); its first spelling where
    it was not typed (a run folder's setting, a default)."""
    return (getattr(args, "spelled", None) or {}).get(dest) or f"--{dest.replace('_', '-')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help=f"a size ({', '.join(list_sizes())}), the config.json (or checkpoint folder) of "
        "any causal LM transformers builds, or a lowbit run folder (that run: its model and "
        "settings, each replaced by the flag that gives it)",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="a recipe (default bf16-mixed, or a run folder's: an auto run's at the plan it "
        "logged last), or several separated by commas "
        "for a side-by-side table: " + ", ".join(accepted_names()),
    )
    parser.add_argument(
        "--optimizer-state",
        default=None,
        help="Adam state precision (default fp32, or a run folder's): "
        + ", ".join(STATE_PRECISIONS),
    )
    parser.add_argument(
        "--task",
        default=None,
        help=f"{' or '.join(TASKS)} (default causal-lm, or a lowbit run folder's own task; token "
        "classification: an encoder's config.json or folder, with one output per tag of the "
        "built-in task as lowbit train builds it without --data, or a run folder with its own)",
    )
    parser.add_argument(
        "--batch",
        action=_Spelled,
        type=int,
        default=None,
        help="micro-batch per device (default 1; for a lowbit run folder, the run's --batch-size "
        "over --gpus, as its processes split it)",
    )
    parser.add_argument(
        "--batch-size",
        action=_Spelled,
        type=int,
        default=None,
        help="lowbit train's --batch-size instead of --batch: the global batch, which the --gpus "
        "split (--batch-size 16 --gpus 2 is --batch 8)",
    )
    parser.add_argument(
        "--seq",
        "--seq-len",  # as `lowbit train` names it
        dest="seq",
        action=_Spelled,
        type=int,
        default=None,
        help=f"sequence length (also --seq-len, as in lowbit train; default {DEFAULT_SEQ}, or "
        "lowbit train's "
        f"{TASK_DEFAULTS['token-classification']['seq_len']} with --task token-classification; "
        "for a lowbit run folder, the run's --seq-len)",
    )
    parser.add_argument(
        "--gpus",
        "--nproc",  # as `lowbit train` names them
        dest="gpus",
        action=_Spelled,
        type=int,
        default=None,
        help="data-parallel devices (also --nproc, as in lowbit train); with --sharding fsdp they "
        "share the model states (default 1, or a run folder's --nproc)",
    )
    parser.add_argument(
        "--sharding",
        "--strategy",
        dest="sharding",
        default=None,
        action=_Spelled,
        help=f"{', '.join(SHARDING)} (default none, or a run folder's --strategy; also "
        "--strategy, as in lowbit train): every device holds the whole model states (none, ddp), "
        "or they are sharded over --gpus (fsdp)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep only each block's input for the backward and recompute the rest (default off, "
        "or a run folder's; --no-activation-checkpointing turns a run's off)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="PATTERN=WHAT",
        help="per-layer precision as lowbit train takes it, repeatable: "
        "PATTERN=keep|PRESET|OPERAND:FORMAT,... (e.g. lm_head=fp32); first match wins; given, "
        "they replace a run folder's overrides",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the estimate as one JSON object (bytes per component, as the table)",
    )


def _recipes(args) -> dict[str, Recipe]:
    """The recipes of ``--recipe`` by name, each with the ``--override`` list applied as
    `lowbit train` applies it (`lowbit.train.config`): the run the estimate stands for."""
    names = [name.strip() for name in args.recipe.split(",") if name.strip()]
    if not names:
        raise UsageError("no recipe given; fix: --recipe bf16-mixed (or a,b,c to compare)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"recipe {dup!r} is listed twice in --recipe; fix: list it once")
    # unknown names and malformed overrides fail here, in one line
    return {
        name: _at_run_plan(args, get_recipe(name)).with_overrides(*args.override) for name in names
    }


def _at_run_plan(args, recipe: Recipe) -> Recipe:
    """``recipe`` at the plan of the ``auto`` run folder ``--model`` names, where ``recipe`` is
    that run's (same budget) and the run logged a plan (`last_plan`): the formats it trains in.
    Until session 38 every auto run was estimated at the bf16 plan it starts from (`nano`'s
    auto:fp4 run: 301,056 bytes of temporary copies over the measured); a run stopped before its
    first check still is, and says so. A folder quantized or pruned from an auto run (its
    config.yaml, the run's settings) is that run's training, at the run's plan (`training_run`;
    until session 38 at the start); one whose run is moved or deleted, at the start."""
    from lowbit.diagnostics.auto import last_plan
    from lowbit.infer.io import training_run
    from lowbit.recipes.auto import at_plan, budget_of
    from lowbit.train.config import is_run_folder, read

    budget = budget_of(recipe)
    if budget is None or not is_run_folder(args.model):
        return recipe
    if budget_of(get_recipe(read(args.model).recipe)) != budget:
        return recipe
    run = training_run(args.model)
    found = last_plan(run) if run.is_dir() else None
    if found is None:
        return recipe
    step, plan, idle = found
    return at_plan(recipe, plan, step, idle)


def _largest_batches(args, recipe: Recipe) -> list[tuple[int, float, int]]:
    """(GiB, usable bytes, largest micro-batch) per accelerator in `ACCELERATORS_GIB`."""
    out = []
    for gib in ACCELERATORS_GIB:
        capacity = gib * 2**30 * (1 - RESERVE)
        largest = fits(
            args.model,
            recipe,
            args.optimizer_state,
            args.seq,
            capacity,
            gpus=args.gpus,
            sharding=args.sharding,
            activation_checkpointing=args.activation_checkpointing,
            task=args.task,
        )
        out.append((gib, capacity, largest))
    return out


def _settings(args, num_params: int) -> str:
    task = "" if args.task == "causal-lm" else f" ({args.task})"
    head = "" if args.task == "causal-lm" else f" ({_head(args)})"
    sharding = f"sharding {'none' if args.sharding == 'ddp' else args.sharding}"
    if args.sharding == "fsdp" and args.gpus == 1:  # `estimate` counts it as none
        sharding = "sharding none (fsdp over one GPU shards nothing)"
    return (
        f"model {args.model}{task}: {num_params:,} parameters{head}; "
        f"{args.optimizer_state} optimizer states; "
        f"batch {args.batch} x seq {args.seq}; {args.gpus} GPU(s), {sharding}"
        + ("; activation checkpointing" if args.activation_checkpointing else "")
        + "".join(f"; --override {text}" for text in args.override)
    )


def _head(args) -> str:
    """A token classifier's labels as estimated: a run folder's own, or for a model folder the
    built-in task's, as `lowbit train` without --data trains it (`load_model_config`)."""
    from lowbit.train.config import is_run_folder

    labels = load_model_config(args.model, args.task)[0].num_labels
    where = "the run's" if is_run_folder(args.model) else "the built-in task's"
    return f"a head of {labels} labels, {where}"


REBUILD = "DDP rebuild"  # the several-recipe table's column of `Breakdown.bucket_rebuild`


def _memory_columns(planned: list) -> list[tuple]:
    """The several-recipe table's memory columns before its total, as ``(title, cell)`` with
    ``cell(estimate) -> str``: model states, activations, temporaries, and where any row has one,
    the logits' gradient and a DDP rank's bucket rebuild. A row's total is its model states + its
    activations + temporaries + logits' gradient, or + its bucket rebuild where that is larger
    (`Breakdown.total`; the two never coexist), whose cell is then marked ``*``, the others
    padded by a space to stay aligned."""
    columns = [
        ("model states", lambda b: human(b.model_states)),
        ("activations", lambda b: human(b.activations)),
        ("temporaries", lambda b: human(b.temporaries)),
    ]
    if any(b.logits_gradient for b in planned):
        columns.append(("logits grad", lambda b: human(b.logits_gradient)))
    if any(b.bucket_rebuild for b in planned):
        columns.append(
            (REBUILD, lambda b: human(b.bucket_rebuild) + "* "[b.peak_set_by != "bucket rebuild"])
        )
    return columns


def compare_recipes(args, recipes: dict[str, Recipe]) -> int:
    """One row per recipe: memory per device by component, its ratio to the first recipe's, and
    the largest micro-batch that fits each accelerator."""
    kw = dict(
        gpus=args.gpus,
        sharding=args.sharding,
        activation_checkpointing=args.activation_checkpointing,
        task=args.task,
        global_batch=args.global_batch,
    )
    names = list(recipes)
    rows = [
        (name, estimate(args.model, recipe, args.optimizer_state, args.batch, args.seq, **kw))
        for name, recipe in recipes.items()
    ]
    _check_checkpointing(args, rows[0][1])
    say_held_notes()  # a --model folder's sequence length, once the estimate stands
    _warn_split_state_blocks(rows[0][1])  # the model and states of every row
    if args.json:
        print(
            json.dumps(
                {
                    "settings": _json_settings(args, rows[0][1].num_params),
                    "recipes": {
                        name: _json_estimate(b, _largest_batches(args, recipes[name]))
                        for name, b in rows
                    },
                }
            )
        )
        return 0
    print(_settings(args, rows[0][1].num_params))
    columns = _memory_columns([b for _, b in rows])
    vs = max(9, len(names[0]) + 4)
    head = (
        f"{'recipe':<17}"
        + "".join(f"{title:>13}" for title, _ in columns)
        + f"{'total':>13}{'vs ' + names[0]:>{vs}}"
        + "".join(f"{f'{gib} GB':>8}" for gib in ACCELERATORS_GIB)
    )
    print(head)
    print("-" * len(head))
    base = rows[0][1].total
    for name, b in rows:
        batches = "".join(
            f"{largest:>8}" for _, _, largest in _largest_batches(args, recipes[name])
        )
        print(
            f"{name:<17}"
            + "".join(f"{cell(b):>13}" for _, cell in columns)
            + f"{human(b.total):>13}{f'{b.total / base:.2f}x':>{vs}}{batches}"
        )
    terms = " + ".join(title for title, _ in columns if title != REBUILD)
    if any(b.bucket_rebuild for _, b in rows):
        terms += f", or model states + {REBUILD} where marked * (the larger: they never coexist)"
    print(
        f"\nbytes per device; total = {terms}; the GB columns: the largest micro-batch "
        f"that fits an accelerator of that memory (N GB taken as N GiB; {RESERVE:.0%} reserved "
        "for context and fragmentation)"
    )
    _print_notes(rows)
    return 0


def _print_notes(rows) -> None:
    """Each distinct note of the ``(recipe name, estimate)`` rows once, as the single-recipe text
    prints them, with the recipes it applies to (until session 37 the table printed none); a
    split state block's is warned (`_warn_split_state_blocks`)."""
    applies: dict[str, list[str]] = {}
    for name, planned in rows:
        for note in planned.notes:
            if SPLIT_STATE_BLOCKS not in note:
                applies.setdefault(note, []).append(name)
    for note, names in applies.items():
        which = "every recipe" if len(names) == len(rows) else ", ".join(names)
        print(f"note ({which}): {note}")


def _json_settings(args, num_params: int) -> dict:
    """What the table's settings line says, as `--json` gives it."""
    return {
        "model": args.model,
        "task": args.task,
        "num_params": num_params,
        "optimizer_state": args.optimizer_state,
        "batch": args.batch,
        "seq": args.seq,
        "gpus": args.gpus,
        # `estimate` counts ddp, and fsdp over one GPU, as no sharding (`_settings` says so)
        "sharding": args.sharding if args.sharding == "fsdp" and args.gpus > 1 else "none",
        "activation_checkpointing": args.activation_checkpointing,
        "overrides": args.override,
    }


def _json_estimate(planned, largest_batches) -> dict:
    """``planned``'s bytes per device by component (the table's rows, `COMPONENTS` and
    ``total``, the peak; the backward's transient ``logits_gradient``; a DDP rank's
    ``bucket_rebuild`` and which term, it or the activations,
    sets the peak: ``peak_set_by``), its notes, and for each accelerator whether it fits and the
    largest micro-batch."""
    out = {name: getattr(planned, name) for name in COMPONENTS}
    out["model_states"] = planned.model_states
    out["bucket_rebuild"] = planned.bucket_rebuild
    out["logits_gradient"] = planned.logits_gradient
    out["total"] = planned.total
    out["peak_set_by"] = planned.peak_set_by
    out["notes"] = planned.notes
    out["fits"] = {
        f"{gib} GB": {"fits": planned.total <= capacity, "largest_batch": largest}
        for gib, capacity, largest in largest_batches
    }
    return out


def _warn_split_state_blocks(planned) -> None:
    """Warn where ``planned`` (an FSDP estimate) shards quantized optimizer states across their
    blocks: the run it estimates would be refused at its first optimizer step."""
    for note in planned.notes:
        if SPLIT_STATE_BLOCKS in note:
            print(f"lowbit: warning: {note}", file=sys.stderr)


def _check_checkpointing(args, planned) -> bool:
    """Whether the model supports activation checkpointing (``planned``, an estimate asked for it,
    says); refused in one line where --activation-checkpointing asks for it, as train refuses it."""
    if NOT_CHECKPOINTABLE not in planned.notes:
        return True
    if args.activation_checkpointing:
        raise UsageError(
            f"model {args.model} does not support activation checkpointing (lowbit train refuses "
            "it too); fix: drop --activation-checkpointing"
        )
    return False


# What `lowbit estimate` estimates where neither a flag nor a run folder says otherwise (--seq:
# `_default_seq`)
DEFAULTS = dict(
    task="causal-lm", recipe="bf16-mixed", override=[], optimizer_state="fp32", batch=1,
    gpus=1, sharding="none", activation_checkpointing=False,
)  # fmt: skip


def _default_seq(task: str) -> int:
    """--seq where neither the flag nor a run folder gives it: 1024 for a causal LM, `lowbit
    train`'s default for a tagger (64). Until session 36 it was 1024 for both, which every
    BERT-family encoder (512 positions) refused."""
    tagger = task == "token-classification"  # other tasks: refused by the estimate, not here
    return TASK_DEFAULTS[task]["seq_len"] if tagger else DEFAULT_SEQ


def _with_run_settings(args) -> None:
    """Fill the settings ``args`` leaves unset (None) from the lowbit run folder ``--model`` names,
    so that its estimate is that run's (until session 32 a run folder gave only its model, task and
    --seq-len, and was estimated as bf16-mixed with fp32 states, batch 1 and no checkpointing
    whatever it ran); a flag that is given wins. The rest get `DEFAULTS`."""
    from lowbit.train.config import is_run_folder, read

    # the global batch the GPUs split, where one is given (not --batch, per device): an FSDP
    # note's device counts divide it
    args.global_batch = args.batch_size
    if is_run_folder(args.model):
        run = read(args.model)
        recorded = {
            # a tagger's run folder: token-classification; a CNN's is refused as the run's task
            "task": run.task if run.task in TASKS else None,
            # an encoder's 64 positions refuse the default 1024
            "seq": run.seq_len or TASK_DEFAULTS[run.task]["seq_len"],
            "recipe": run.recipe,
            "override": run.overrides,
            "optimizer_state": run.optimizer_state,
            "gpus": run.nproc,
            "sharding": run.strategy,
            "activation_checkpointing": run.activation_checkpointing,
        }
        for name, value in recorded.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        for what, value in (("batch size", run.batch_size), ("nproc", run.nproc)):
            if value is not None:  # a config.yaml edited by hand: named as the run's, not a flag's
                check_count(value, f"{args.model}: the run's {what}")
        if args.batch is None and args.batch_size is None and run.batch_size is not None:
            # its --batch-size is the global batch, which its processes split (`lowbit train`)
            whose = f"{args.model}: the run's batch size"
            args.batch = _split_run_batch(run.batch_size, args.gpus, whose, _flag(args, "gpus"))
            args.global_batch = run.batch_size
    if args.batch is not None and args.batch_size is not None:
        raise UsageError(
            f"--batch {args.batch} and --batch-size {args.batch_size} both give the batch; fix: "
            "one of them (--batch per device, or lowbit train's --batch-size over the GPUs)"
        )
    if args.batch_size is not None:
        gpus = DEFAULTS["gpus"] if args.gpus is None else args.gpus
        args.batch = _split_run_batch(args.batch_size, gpus, "--batch-size", _flag(args, "gpus"))
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq is None:
        args.seq = _default_seq(args.task)
        if args.task == "causal-lm":  # a small folder's positions, as `lowbit train` takes them
            positions = config_positions(load_model_config(args.model, args.task)[0])
            args.seq = default_seq_len(args.seq, positions, "--seq")


def _split_run_batch(global_batch: int, gpus: int, whose: str, gpus_flag: str) -> int:
    """The micro-batch per device of `lowbit train`'s ``--batch-size`` (``whose``: a run
    folder's, or the flag's): the global batch, which its ``gpus`` processes split (``gpus_flag``:
    --gpus or --nproc, as typed)."""
    if gpus < 1:  # a run folder's --nproc edited to 0: the estimate refuses it
        return global_batch
    if global_batch % gpus:
        raise UsageError(
            f"{whose} {global_batch} (its global batch) does not split evenly over {gpus} GPUs; "
            f"fix: --batch N (the micro-batch per device), or {gpus_flag} dividing {global_batch}"
        )
    return global_batch // gpus


def _check_counts(args) -> None:
    """Refuse a count flag given below 1 (`check_count`), named as the user typed it, before a
    run folder's settings fill the rest: ``--seq-len 0`` was refused as "(--seq)", and
    ``--batch-size 0 --gpus 0`` as --batch's."""
    for dest in ("batch", "batch_size", "seq", "gpus"):
        if getattr(args, dest) is not None:
            check_count(getattr(args, dest), _flag(args, dest))


def _check_choices(args) -> None:
    """Refuse an unknown --sharding or --task (given, or a run folder's) with the flag to give,
    as `lowbit train` refuses its choices; an image-classification task has its own refusal."""
    valid = f"{', '.join(SHARDING[:-1])} or {SHARDING[-1]}"
    choose("sharding", args.sharding, SHARDING, fix=f"{_flag(args, 'sharding')} {valid}")
    if args.task != "image-classification":
        choose("task", args.task, TASKS, fix=f"--task {' or '.join(TASKS)}")


def run(args) -> int:
    # an unset shell variable (--model "$RUN"): read as the current folder, a run folder there too
    check_given(args.model, "--model", "give a size, a config.json or its folder, or a run folder")
    # a quoted ~ (`--model=~/runs/r`, a script's argument) is the home folder, as lowbit train
    # reads its --model: it was "nothing at that path"
    args.model = os.path.expanduser(args.model)
    _check_counts(args)
    _with_run_settings(args)
    _check_choices(args)
    recipes = _recipes(args)
    if len(recipes) > 1:
        return compare_recipes(args, recipes)
    name, recipe = next(iter(recipes.items()))  # as listed, without spaces or a trailing comma
    kw = dict(
        gpus=args.gpus, sharding=args.sharding, task=args.task, global_batch=args.global_batch
    )
    without = estimate(args.model, recipe, args.optimizer_state, args.batch, args.seq, **kw)
    with_ckpt = estimate(
        args.model,
        recipe,
        args.optimizer_state,
        args.batch,
        args.seq,
        **kw,
        activation_checkpointing=True,
    )
    unsupported = not _check_checkpointing(args, with_ckpt)
    say_held_notes()  # a --model folder's sequence length, once the estimate stands
    _warn_split_state_blocks(without)
    chosen = with_ckpt if args.activation_checkpointing else without
    largest_batches = _largest_batches(args, recipe)
    if args.json:
        out = _json_estimate(chosen, largest_batches)
        out["activations_without_checkpointing"] = without.activations
        out["activations_with_checkpointing"] = None if unsupported else with_ckpt.activations
        settings = _json_settings(args, chosen.num_params)
        print(json.dumps({"settings": settings | {"recipe": name}, **out}))
        return 0
    print(_settings(args, chosen.num_params).replace("; ", f"; recipe {name}; ", 1))
    print(chosen.table(titles=("bytes/device", ""), checkpointed=args.activation_checkpointing))
    for note in chosen.notes:  # as --json gives them; a split state block's is warned above
        if SPLIT_STATE_BLOCKS not in note:
            print(f"note: {note}")
    print(
        f"activations without checkpointing {without.activations:,} ({human(without.activations)}), "
        + (
            "with: this model does not support activation checkpointing (lowbit train refuses it)"
            if unsupported
            else f"with {with_ckpt.activations:,} ({human(with_ckpt.activations)})"
        )
    )
    print(
        f"\nfits (N GB taken as N GiB; {RESERVE:.0%} of each device reserved for context and "
        "fragmentation):"
    )
    for gib, capacity, largest in largest_batches:
        verdict = "yes" if chosen.total <= capacity else "no"
        print(f"  {gib:>4} GB  {verdict:<4} largest batch {largest}")
    return 0
