"""A copy of this machine's built kernels in a fresh cache, for the build-lock tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from lowbit import kernels


@pytest.fixture
def build_copy(tmp_path):
    """A copy of this machine's built kernels in a fresh TORCH_EXTENSIONS_DIR (loaded from there
    in about a second, nothing to rebuild): (its build folder, the environment that uses it)."""
    assert kernels.available(), kernels.build_error()
    name = f"lowbit_kernels_{kernels._cpu_tag()}"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    where = (
        f"from torch.utils import cpp_extension as c; print(c._get_build_directory({name!r}, 0))"
    )
    folder = subprocess.run(
        [sys.executable, "-c", where], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    shutil.rmtree(folder)
    shutil.copytree(cpp_extension._get_build_directory(name, verbose=False), folder)
    return Path(folder), env
