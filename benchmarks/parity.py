"""Parity study: `lowbit compare` of every preset recipe against fp32 on the three tasks.

    python benchmarks/parity.py --measure            # seconds per step of every recipe (sizing)
    python benchmarks/parity.py                      # the full study (3 seeds, every preset)
    python benchmarks/parity.py --jobs 1             # one run at a time (default: one per core)
    python benchmarks/parity.py --device cpu         # on the CPU (default: a GPU where there is one)
    python benchmarks/parity.py --recipes fp32,bf16-mixed,mxfp4 --seeds 1 --lm-steps 150 --no-write
    python benchmarks/parity.py --golden             # rewrite tests/golden/parity_tiny.json

Results go to ``<out>/<task>/report/`` (report.md, report.html, results.json, plots) and, unless
``--no-write``, into the "Parity" section of BENCHMARKS.md and the results section of
docs/parity.md, replacing the recorded study there (a quick run, as the one above, keeps it with
``--no-write``); a run of some ``--tasks`` replaces those tasks' results only, each under the
command that made it. Every task uses one workload for every recipe: nothing is tuned per recipe.
Runs are reused, so an interrupted study continues where it stopped when started again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# lowbit from this checkout, and benchmarks_md from this folder also where this file is loaded as
# a module (the tests), not run as a script
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from benchmarks_md import DefaultsFormatter, ScriptParser, at_least  # noqa: E402

import lowbit  # noqa: E402
from lowbit.errors import RunNotWritten, UsageError  # noqa: E402
from lowbit.report import compare, make_study  # noqa: E402
from lowbit.report.compare import check_out, check_runs  # noqa: E402
from lowbit.report.markdown import (  # noqa: E402
    md_table,
    non_finite_line,
    tables,
    trend_line,
    verdict_lines,
)
from lowbit.train.config import write_atomically  # noqa: E402

# One workload per task. Sized for 2 CPU cores: the causal LM (Llama size nano, 0.18 M parameters,
# byte tokens of the Python stdlib) runs 128 x 64 tokens per step. The batch is what narrows the
# seed spread of the paired gaps: at 8 x 64 tokens per step (model tiny, the study until session
# 12) each run's trajectory decided gaps of 1-2%; at 128 x 64 a 2-layer pilot's bf16-mixed gaps
# spread by 0.16% (docs/parity.md, "The causal-LM workload").
WORKLOADS = {
    "causal-lm": {
        "task": "causal-lm",
        "model": "nano",
        "seq_len": 64,
        "batch_size": 128,
        "lr": 3e-3,
        "warmup_steps": 20,
        # 32 x 128 x 64 = 262,144 validation tokens (the split holds 916,736): the evaluation
        # adds little to the spread (docs/parity.md, "Evaluation tokens").
        "eval_batches": 32,
    },
    "token-classification": {
        "task": "token-classification",
        "model": "tiny",
        "seq_len": 32,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 10,
        "eval_batches": 8,
    },
    "image-classification": {
        "task": "image-classification",
        "model": "tiny",
        "batch_size": 32,
        "lr": 3e-3,
        "warmup_steps": 10,
        "eval_batches": 100,  # the whole validation split
    },
}
# Evaluations per run (the start's not counted); fewer for the causal LM, whose evaluations are
# larger (~2.5 s each at one thread against ~120 s of training: a run's wall_time minus steps x
# step_time in its compare.json).
EVALS = {"causal-lm": 4, "token-classification": 8, "image-classification": 8}
# 540 causal-LM steps of 128 x 64 tokens (4.4M tokens per run; a multiple of EVALS, so the last
# evaluation is the final one): what fits the ~60-minute budget with 3 seeds of 20 presets, two
# runs at a time on two cores (--jobs; docs/parity.md, "Running the full study").
DEFAULT_STEPS = {"causal-lm": 540, "token-classification": 200, "image-classification": 200}

GOLDEN = ROOT / "tests" / "golden" / "parity_tiny.json"
GOLDEN_RECIPES = "fp32,bf16-mixed,fp8-tensorwise,mxfp4"
GOLDEN_SETTINGS = {
    "task": "causal-lm",
    "model": "tiny",
    "seq_len": 16,
    "batch_size": 4,
    "steps": 12,
    "warmup_steps": 3,
    "eval_interval": 12,
    "eval_batches": 1,
}

# Per recipe: this many times the drift measured when the reduction order changes (1 -> 2 threads),
# and never below GOLDEN_FLOOR: 5e-4 of a loss near 3.7 (1.4e-4 relative), below the smallest
# difference between two golden recipes (fp32 vs bf16-mixed, ~8e-4 after 12 steps), which
# test_golden checks. Another kind of CPU is not covered by a tolerance: its bf16 GEMMs round their
# outputs after summing in another order, and over 12 steps that moves bf16-mixed by up to 3e-3
# and mxfp4 by up to 2e-2 (measured in session 14 between AMX, AVX512-BF16 and AVX2 kernels), more
# than the recipes differ. So the file keeps one reference per kind of CPU (`cpu_kind`), and a
# rerun must match one of them.
GOLDEN_FACTOR, GOLDEN_FLOOR = 4.0, 5e-4

SECTION = "## Parity (benchmarks/parity.py)"
DOC_BEGIN, DOC_END = "<!-- parity results: begin -->", "<!-- parity results: end -->"


def measure(recipes: list[str], tasks: list[str], steps: int = 3, device: str = "auto") -> dict:
    """Seconds per training step of every recipe on every task's workload (after one warm-up)."""
    from lowbit.train import TrainConfig, Trainer

    out = {}
    for task in tasks:
        for recipe in recipes:
            config = TrainConfig(
                **WORKLOADS[task],
                recipe=recipe,
                steps=100,
                device=device,
                out="/tmp/lowbit-parity-measure",
            )
            trainer = Trainer(config, quiet=True)
            trainer.step()  # first-call allocations
            trainer.step()  # the trainer's one-off memory report (an extra forward and backward)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            out[(task, recipe)] = (time.perf_counter() - t0) / steps
            print(f"{task:<22}{recipe:<18}{out[(task, recipe)]:.3f} s/step", flush=True)
    return out


def task_study(task, recipes, seeds, steps, out, device="auto"):
    settings = {**WORKLOADS[task], "steps": steps, "eval_interval": max(1, steps // EVALS[task])}
    settings["device"] = device
    return make_study(recipes, settings, seeds=seeds, out=Path(out) / task)


def run_task(study, quiet) -> dict:
    task = study.out.name
    result = compare(study, quiet=quiet, log=lambda line: print(f"  {task}: {line}", flush=True))
    runs = [r for rs in result.results["runs"].values() for r in rs]
    result.results["wall_s"] = sum(r.get("wall_time") or 0 for r in runs)  # also when reused
    return result.results


def train_all(studies: dict, jobs: int, threads: int) -> set:
    """Train every run of every task's study, ``jobs`` at a time (`lowbit.report.parallel`),
    longest first: the causal LM's runs, then the classification tasks'."""
    from lowbit.report.parallel import train_runs

    runs = [
        (study, recipe, seed)
        for study in sorted(studies.values(), key=lambda s: s.out.name != "causal-lm")
        for recipe in study.recipes
        for seed in study.seeds
    ]
    return train_runs(runs, jobs, threads, log=lambda line: print(f"  {line}", flush=True))


_ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")  # Linux; elsewhere no flags and an unknown model
    return path.read_text().splitlines() if path.is_file() else []


def cpu_kind(cpuinfo: list[str]) -> str:
    """The kind of CPU kernels this process's GEMMs run on: PyTorch's CPU capability (``avx512``,
    ``avx2``, ...; ``ATEN_CPU_CAPABILITY`` lowers it), with ``-amx`` or ``-bf16`` where an AVX-512
    CPU has AMX or AVX512-BF16 instructions for bf16 GEMMs."""
    kind = torch.backends.cpu.get_cpu_capability().lower()
    flags = {flag for line in cpuinfo if line.startswith("flags") for flag in line.split()}
    if kind == "avx512" and "amx_bf16" in flags:
        return "avx512-amx"
    if kind == "avx512" and "avx512_bf16" in flags:
        return "avx512-bf16"
    return kind


def _cpu_model(cpuinfo: list[str]) -> str:
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    caps = [f"{k}={os.environ[k]}" for k in _ISA_CAPS if k in os.environ]
    return (names[0] if names else "unknown") + (f" ({', '.join(caps)})" if caps else "")


def golden(path: Path = GOLDEN) -> dict:
    """Rerun the small parity study of the golden test and store its loss curves as this kind of
    CPU's reference, keeping the references of other kinds already in the file. For a machine with
    AVX2 kernels only, run it again under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
    MKL_ENABLE_INSTRUCTIONS=AVX2``."""
    import tempfile

    runs = {}
    for threads in (1, 2):  # 2 threads: the same run with reductions in another order
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            study = make_study(GOLDEN_RECIPES, GOLDEN_SETTINGS, seeds=[0], out=Path(tmp) / "g")
            runs[threads] = compare(study, plots=False, log=print).results
    torch.set_num_threads(1)
    results = runs[1]
    reorder = {
        recipe: max(
            abs(a[1] - b[1])
            for a, b in zip(run["curves"]["train"], runs[2]["recipes"][recipe]["curves"]["train"])
        )
        for recipe, run in results["recipes"].items()
    }
    command = f"lowbit compare --recipes {GOLDEN_RECIPES} --seeds 1 --threads 1 " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in GOLDEN_SETTINGS.items()
    )
    old = json.loads(path.read_text()) if path.is_file() else {}
    same_run = old.get("settings") == GOLDEN_SETTINGS and old.get("torch") == torch.__version__
    references = dict(old.get("references", {})) if same_run else {}
    cpuinfo = _cpuinfo()
    kind = cpu_kind(cpuinfo)
    references[kind] = {
        "cpu": _cpu_model(cpuinfo),
        "reorder_max_abs": reorder,
        "curves": {
            recipe: {
                "train": [loss for _, loss in run["curves"]["train"]],
                "validation": run["curves"]["validation"],
            }
            for recipe, run in results["recipes"].items()
        },
    }
    data = {
        "command": command,
        "regenerate": "python benchmarks/parity.py --golden",
        "settings": GOLDEN_SETTINGS,
        "seed": 0,
        "threads": 1,
        "torch": torch.__version__,
        "recipes": GOLDEN_RECIPES.split(","),
        "tolerance": {
            recipe: max(
                [GOLDEN_FLOOR]
                + [GOLDEN_FACTOR * ref["reorder_max_abs"][recipe] for ref in references.values()]
            )
            for recipe in GOLDEN_RECIPES.split(",")
        },
        "references": references,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} (reference {kind}; kept: {', '.join(sorted(references))})")
    return data


def markdown(all_results: dict, command: str, note: str, alone: bool = False) -> str:
    """The Parity section; ``alone``: each task's part names the command and note itself, for a
    run of some tasks whose parts go beside the recorded ones of the others (`replace_section`)."""
    lines = [SECTION, "", note, "", "```bash", command, "```", ""]
    for task, results in all_results.items():
        s = results["settings"]
        b = s["base"]
        shape = f"batch {b['batch_size']}" + (
            f" x {b['seq_len']} tokens" if b.get("seq_len") else ""
        )
        lines += [
            f"### {task}: model {b['model']}, {b['steps']} steps, {shape}, seeds "
            f"{','.join(map(str, s['seeds']))} ({results.get('wall_s', 0) / 60:.0f} min, run times "
            "summed)",
            "",
        ]
        if alone:
            lines += [
                f"Rerun of this task alone: {note}".rstrip(),
                "",
                "```bash",
                command,
                "```",
                "",
            ]
        # as report.md writes them: cells escaped (a `|` or `<` in a label), and a table without
        # a header (the baseline did not evaluate, `gap_by_evaluation`) its title alone
        for title, header, rows in tables(results):
            lines += [f"{title}.", ""] + ([md_table(header, rows), ""] if header else [])
        lines += ["Verdicts:", ""]
        lines += [f"- {line}" for line in verdict_lines(results)]
        lines.append("")
        for line in (trend_line(results), non_finite_line(results)):
            if line:
                lines += [line, ""]
    return "\n".join(lines)


def _parts(text: str) -> list[str]:
    """``text`` cut before each ``### `` heading: a task's results are one part."""
    return [part.rstrip() + "\n\n" for part in re.split(r"(?m)^(?=### )", text) if part.strip()]


def _task_of(part: str) -> str | None:
    return next((task for task in WORKLOADS if part.startswith(f"### {task}: ")), None)


def merge_results(old: str, text: str, rerun: tuple[list[str], str] | None) -> str:
    """The results of ``old`` (a page's recorded Parity results) replaced by ``text``; with
    ``rerun`` (the tasks of a run of some tasks, and `markdown` of them ``alone``), only those
    tasks' parts are replaced and the recorded results of the other tasks kept: a rerun of one
    task dropped the others' results of the full study. Where no other task is recorded, all of
    ``text``."""
    if rerun is None:
        return text
    tasks, alone = rerun
    parts = _parts(old)
    if all(_task_of(part) in (None, *tasks) for part in parts):
        return text
    new = {_task_of(part): part for part in _parts(alone) if _task_of(part)}
    last = max(i for i, part in enumerate(parts) if _task_of(part))
    merged = [new.pop(_task_of(part), part) for part in parts]
    merged[last + 1 : last + 1] = new.values()  # tasks not recorded before: after the others
    return "".join(merged)


def replace_section(path: Path, text: str, rerun: tuple[list[str], str] | None = None) -> None:
    """Replace the Parity section of BENCHMARKS.md (up to the next '## '), or append it; a
    ``rerun`` of some tasks replaces those tasks' results only (`merge_results`)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = (
        pattern.sub(lambda m: merge_results(m[0], text, rerun).rstrip() + "\n\n", old)
        if pattern.search(old)
        else (old.rstrip() + "\n\n" + text.rstrip() + "\n")
    )
    # whole or not at all: a Ctrl-C mid-write truncated the page, every other benchmark's section
    write_atomically(path, new)


def replace_doc_results(path: Path, text: str, rerun: tuple[list[str], str] | None = None) -> None:
    old = path.read_text(encoding="utf-8")
    start, end = old.index(DOC_BEGIN) + len(DOC_BEGIN), old.index(DOC_END)
    if rerun is not None:
        rerun = (rerun[0], rerun[1].replace(SECTION, "### Measured"))
    body = merge_results(old[start:end], text.replace(SECTION, "### Measured"), rerun).strip()
    write_atomically(path, old[:start] + "\n" + body + "\n" + old[end:])


def check_pages(root: Path) -> None:
    """Refuse, before any run, pages the results cannot be written into: a docs/parity.md without
    its two markers failed with a traceback after BENCHMARKS.md was already written."""
    doc = root / "docs" / "parity.md"
    if not doc.is_file():
        raise UsageError(f"{doc}: no such file; fix: restore it, or run with --no-write")
    text = doc.read_text(encoding="utf-8")
    for marker in (DOC_BEGIN, DOC_END):
        if marker not in text:
            raise UsageError(
                f"{doc}: no line {marker!r} around its results; fix: put it back (begin above "
                "the results, end below), or run with --no-write"
            )
    if text.index(DOC_END) < text.index(DOC_BEGIN):
        raise UsageError(
            f"{doc}: {DOC_END!r} stands above {DOC_BEGIN!r}; fix: put begin above the results "
            "and end below, or run with --no-write"
        )
    for page in (root / "BENCHMARKS.md", doc):
        if not os.access(page.parent, os.W_OK) or (page.exists() and not os.access(page, os.W_OK)):
            raise UsageError(f"{page}: not writable; fix: make it writable, or run with --no-write")


def recorded_command(argv: list[str]) -> str:
    """The command written above the results, quoted as a shell reads it back: a --note of
    several words was written bare, and typed again it failed ("unrecognized arguments")."""
    return "python benchmarks/parity.py " + shlex.join(argv)


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument(
        "--recipes", default=",".join(lowbit.recipe_names()), help="default: every preset"
    )
    parser.add_argument("--tasks", default=",".join(WORKLOADS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lm-steps", type=int, default=DEFAULT_STEPS["causal-lm"])
    parser.add_argument("--tok-steps", type=int, default=DEFAULT_STEPS["token-classification"])
    parser.add_argument("--img-steps", type=int, default=DEFAULT_STEPS["image-classification"])
    parser.add_argument(
        "--task-recipes", help="recipes of the two classification tasks (default: --recipes)"
    )
    parser.add_argument(
        "--img-recipes", help="recipes of image-classification (default: --task-recipes)"
    )
    parser.add_argument(
        "--task-seeds", type=int, help="seeds of the classification tasks (default: --seeds)"
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "parity"), help="the studies' folder")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per run")
    # a study continued on a machine with a GPU is refused unless it keeps the device its runs
    # trained on, and the refusal names --device as the fix (`lowbit.report.compare`)
    parser.add_argument(
        "--device",
        default="auto",
        help="device of every run: auto (a GPU where there is one), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs trained at a time in worker processes (default: CPU cores / --threads)",
    )
    parser.add_argument("--measure", action="store_true", help="only time a few steps per recipe")
    parser.add_argument("--golden", action="store_true", help="rewrite the golden loss curves")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="leave BENCHMARKS.md and docs/parity.md as they are (by default this study's "
        "results replace the recorded ones there)",
    )
    parser.add_argument("--note", default="", help="a line written above the results")
    parser.add_argument("--quiet", action="store_true", help="no line per run")
    args = parser.parse_args(argv)
    # --task-seeds 0 was taken for --seeds, and --img-steps 0 was refused as "steps"
    settings = ("seeds", "task_seeds", "lm_steps", "tok_steps", "img_steps", "threads", "jobs")
    at_least(parser, args, 1, *settings)
    torch.set_num_threads(args.threads)
    if args.golden:
        golden()
        return 0
    recipes = args.recipes.split(",")
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in WORKLOADS:
            parser.error(f"unknown task {task!r}; valid: {', '.join(WORKLOADS)}")
    for recipe in {
        *recipes,
        *(args.task_recipes or "").split(","),
        *(args.img_recipes or "").split(","),
    } - {""}:
        if recipe not in lowbit.recipe_names():
            parser.error(f"unknown recipe {recipe!r}; valid: {', '.join(lowbit.recipe_names())}")
    if args.measure:
        try:
            measure(recipes, tasks, device=args.device)
        except UsageError as error:  # an unknown --device, or cuda on a machine without one
            parser.error(str(error))
        return 0
    steps = {
        "causal-lm": args.lm_steps,
        "token-classification": args.tok_steps,
        "image-classification": args.img_steps,
    }
    studies = {}
    if not args.no_write:
        try:
            check_pages(ROOT)
        except UsageError as error:
            parser.error(str(error))
    # bad settings (a recipe listed twice, --seeds 0, an --out of another study, a run folder of
    # another device) before any run
    try:
        for task in tasks:
            lm = task == "causal-lm"
            task_recipes = recipes if lm or not args.task_recipes else args.task_recipes.split(",")
            if task == "image-classification" and args.img_recipes:
                task_recipes = args.img_recipes.split(",")
            seeds = args.seeds if lm or not args.task_seeds else args.task_seeds
            studies[task] = task_study(
                task, task_recipes, seeds, steps[task], args.out, args.device
            )
            check_out(studies[task], overwrite=False)  # `compare` checks them after train_all
            check_runs(studies[task])
    except UsageError as error:
        parser.error(str(error))
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
    started = time.perf_counter()
    try:
        trained = train_all(studies, jobs, args.threads) if jobs > 1 else None
        all_results = {task: run_task(study, args.quiet) for task, study in studies.items()}
    except RunNotWritten as error:  # a full disk: a traceback named neither the run nor the fix
        again = "run the same command again to resume"
        print(f"parity: error: {error.going_on_by(again)}", file=sys.stderr)
        return 1
    except UsageError as error:  # a --jobs worker killed (out of memory?), a run's own refusal
        print(f"parity: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # was a traceback; the pages are written after the runs, whole
        print(
            f"parity: interrupted; BENCHMARKS.md and docs/parity.md left as they were; run the "
            f"same command again to resume (the finished runs in {args.out} are reused)",
            file=sys.stderr,
        )
        return 130
    wall = (time.perf_counter() - started) / 60
    if trained is not None:
        print(f"parity: {wall:.0f} min with {jobs} jobs x {args.threads} threads", flush=True)
    if not args.no_write:
        command = recorded_command(argv or sys.argv[1:])
        if trained:  # a measured wall time only where this invocation trained every run
            total = sum(len(s.recipes) * len(s.seeds) for s in studies.values())
            if len(trained) == total:
                command += f"  # {wall:.0f} min wall, {jobs} jobs x {args.threads} threads"
        text = markdown(all_results, command.strip(), args.note)
        rerun = None
        if set(tasks) != set(WORKLOADS):  # the other tasks' recorded results are kept
            rerun = (tasks, markdown(all_results, command.strip(), args.note, alone=True))
        try:
            replace_section(ROOT / "BENCHMARKS.md", text, rerun)
            replace_doc_results(ROOT / "docs" / "parity.md", text, rerun)
        except OSError as error:  # a full disk: a traceback after the whole study
            print(
                f"parity.py: error: BENCHMARKS.md and docs/parity.md not both updated "
                f"({error.strerror or error}); the reports are in {args.out}/<task>/report; fix: "
                "free disk space and run the same command again (finished runs are reused)",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
