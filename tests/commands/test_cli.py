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


@pytest.mark.parametrize("command", [["eval"], ["generate"], ["quantize", "--to", "int8"]])
def test_a_hugging_face_folder_given_as_a_run_says_what_it_is(tmp_path, capsys, command):
    """`lowbit export`'s output (or any checkpoint folder) is no run: eval its run instead."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}\n')
    assert main([command[0], str(tmp_path), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "a Hugging Face model folder (config.json), not a lowbit run folder" in err
    assert f"--model {tmp_path}" in err and "\n" not in err
