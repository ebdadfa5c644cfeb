"""Session 34: each checkout of lowbit (and each torch installation) builds in a folder of its own."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import lowbit
from lowbit import kernels


def _kernels_of(checkout: Path):
    """The kernels module of another checkout (its file, this process's torch and lowbit)."""
    spec = importlib.util.spec_from_file_location(
        "lowbit_kernels_of_another_checkout", checkout / "lowbit" / "kernels" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_another_checkout_builds_in_a_folder_of_its_own(tmp_path):
    """Two checkouts shared one build folder (named by the CPU alone): ninja saw other command
    lines (the sources' paths) and rebuilt every object each time the other one had loaded,
    half a minute or more under the folder's lock, which every process loading the kernels
    waited for. The folder's name is stable for one checkout and differs for another."""
    here = Path(lowbit.__file__).parent
    other = tmp_path / "checkout"
    shutil.copytree(here, other / "lowbit", ignore=shutil.ignore_patterns("__pycache__"))

    tag = kernels._build_tag()
    again = subprocess.run(
        [sys.executable, "-c", "import lowbit.kernels as k; print(k._build_tag())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert again == tag  # another process of this checkout: the same folder
    copy = _kernels_of(other)
    assert copy._SOURCES[0].parent == other / "lowbit" / "kernels"
    assert copy._build_tag() != tag
