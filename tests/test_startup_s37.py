"""Start-up of the `lowbit` command: what a command does not need, it does not import.

Each `lowbit` process (a command, a `lowbit compare --jobs` worker, a test's subprocess) pays
for its imports in CPU seconds before it does anything: transformers' about two, scikit-learn's
about one. A fresh process runs the command and reports which of those libraries it imported.
"""

import json
import subprocess
import sys

import torch

from lowbit.data import load_digit_splits

WATCHED = ("transformers", "sklearn", "matplotlib", "torch.distributed.tensor", "torch._dynamo")

# `lowbit ARGS` in this process (as the console script runs it), then the watched modules it
# imported, on the last line of stderr
RUN = f"""
import json, runpy, sys
sys.argv = ["lowbit", *json.loads(sys.argv[1])]
try:
    runpy.run_module("lowbit", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    status = exit.code
print(json.dumps([status, [m for m in {WATCHED!r} if m in sys.modules]]), file=sys.stderr)
"""


def imported_by(*args: str, cwd) -> tuple[int, list[str], str]:
    """(exit status, the `WATCHED` modules imported, stderr before the report) of `lowbit ARGS`."""
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    *err, report = done.stderr.rstrip("\n").split("\n")
    status, imported = json.loads(report)
    return status, imported, "\n".join(err)


def test_listing_the_recipes_imports_no_model_library(tmp_path):
    """A guard: the parser imports every command module, so one that imported transformers or
    matplotlib at its top would make `lowbit recipes` (and --help) wait seconds for them."""
    status, imported, err = imported_by("recipes", cwd=tmp_path)
    assert (status, imported) == (0, []), err


def test_a_quiet_digits_run_imports_neither_scikit_learn_nor_transformers(tmp_path, monkeypatch):
    """The digits come from the on-disk cache after the first run (not from scikit-learn,
    imported only to make the entry), and turning transformers' progress bars off for a quiet run
    no longer imports transformers, which a CNN does not use: each cost every run its import."""
    cached = load_digit_splits(seed=0)  # the entry (the session's cache folder, conftest.py)
    status, imported, err = imported_by(
        "train", "--task", "image-classification", "--steps", "1", "--quiet", "--out", "run",
        cwd=tmp_path,
    )  # fmt: skip
    assert status == 0, err
    assert "sklearn" not in imported and "transformers" not in imported, imported
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "")  # the cache off: scikit-learn's split again
    computed = load_digit_splits(seed=0)
    for name, (images, labels) in computed.items():
        assert torch.equal(cached[name][0], images) and cached[name][0].dtype == torch.float32
        assert torch.equal(cached[name][1], labels) and cached[name][1].dtype == torch.int64


def test_a_jobs_study_checks_its_named_model_without_importing_transformers(tmp_path):
    """`lowbit compare --jobs` checks the inputs before its workers start; a named size's
    positions are read from its row, not from a LlamaConfig built by importing transformers in a
    process that builds no model."""
    status, imported, err = imported_by(
        "compare", "--recipes", "fp32,bf16-mixed", "--model", "nano", "--seq-len", "5000",
        "--jobs", "2", "--out", "study",
        cwd=tmp_path,
    )  # fmt: skip
    assert status == 2
    assert err.strip().splitlines() == [
        "lowbit: error: sequence length 5000 exceeds the model's 1024 positions; "
        "fix: --seq-len 1024 or less, or a model with more positions"
    ]
    assert "transformers" not in imported, imported
    assert not (tmp_path / "study").exists()
