"""A copy of this machine's built kernels in a fresh cache, for the build-lock tests."""

import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
from torch.utils import cpp_extension

from lowbit import kernels


@pytest.fixture
def build_copy(tmp_path):
    """A copy of this machine's built kernels in a fresh TORCH_EXTENSIONS_DIR (loaded from there
    in about a second, nothing to rebuild): (its build folder, the environment that uses it)."""
    assert kernels.available(), kernels.build_error()
    name = f"lowbit_kernels_{kernels._build_tag()}"
    built = cpp_extension._get_build_directory(name, verbose=False)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    # torch's folder for that environment, found in this process (it reads the variable when
    # called): a process started only to ask it cost a second or two per test
    with mock.patch.dict(os.environ, {"TORCH_EXTENSIONS_DIR": str(tmp_path)}):
        folder = cpp_extension._get_build_directory(name, verbose=False)
    shutil.rmtree(folder)
    shutil.copytree(built, folder)
    return Path(folder), env
