import importlib.util
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowbit.report import compare, make_study
from tests.once import folder_once_per_session


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread (far faster on a busy machine), and one thread fixes
    the order of every floating-point reduction, which the golden-curve test relies on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(line):
    pass


def study_on_one_thread(out, recipes: str, settings: dict, seeds: int, **options) -> dict:
    """``compare`` of a study built once for a module's tests (the autouse `one_thread` is per
    test), on one thread and quiet; its result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study = make_study(recipes, settings, seeds=seeds, out=out)
        return compare(study, log=quiet, **options)
    finally:
        torch.set_num_threads(threads)


# A two-step image-classification study: fast, and its per-label counts are real.
IMAGES = {"task": "image-classification", "batch_size": 16, "steps": 2, "eval_batches": 1}


@pytest.fixture(scope="session")
def image_study(tmp_path_factory):
    """fp32 against bf16-mixed on the digits, two seeds, built once: tests copy it before
    editing (a module that wants another study defines its own ``image_study``); once per
    session, whichever xdist worker asks first."""

    def make(folder):
        study_on_one_thread(folder / "img", "fp32,bf16-mixed", IMAGES, seeds=2, plots=False)
        return folder / "img"

    return folder_once_per_session(tmp_path_factory, "report-images", make)


PARITY = Path(__file__).resolve().parents[2] / "benchmarks" / "parity.py"


@pytest.fixture(scope="module")
def parity():
    """benchmarks/parity.py as a module (it is a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("parity_script", PARITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCHMARKS = PARITY.parent


@pytest.fixture
def as_script(monkeypatch, capsys):
    """``as_script(name, *argv, cwd=folder)``: `python benchmarks/NAME.py ARGV` started in
    ``folder``, run in this process instead (its `__main__` block, the script's folder first on
    sys.path as Python puts it; sys.path and the folder restored after the test): its
    ``returncode`` (as the interpreter makes it of a `SystemExit`, 0 without one), ``stdout`` and
    ``stderr``. Any other exception fails the test, as a traceback would. For tests of what a
    script prints, not of starting a process (a fresh interpreter costs seconds on a busy
    machine); PyTorch runs on the test's one thread."""

    def run(name, *argv, cwd):
        path = BENCHMARKS / f"{name}.py"
        monkeypatch.chdir(cwd)
        monkeypatch.syspath_prepend(str(BENCHMARKS))  # undone with whatever the script adds
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
        capsys.readouterr()
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exit:  # as the interpreter turns it into an exit status
            code = exit.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def pages(parity, tmp_path, monkeypatch, request):
    """A copy of the two pages parity.py writes (the test module's ``RECORDED`` and ``DOC``), in
    place of the repository's."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "BENCHMARKS.md").write_text(request.module.RECORDED)
    (root / "docs" / "parity.md").write_text(request.module.DOC)
    monkeypatch.setattr(parity, "ROOT", root)
    return root
