import pytest
import torch

import lowbit
from lowbit.cli import main


def test_version_names_lowbit_torch_and_python(capsys):
    import platform

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"lowbit {lowbit.__version__} (torch {torch.__version__}")
    assert f"Python {platform.python_version()}" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
