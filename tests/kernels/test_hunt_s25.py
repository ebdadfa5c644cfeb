"""The kernels' build when it cannot succeed, and `lowbit formats --tensor` on odd paths.

Each build test runs a fresh process (the kernels load once per process) with a fresh extension
cache and no working compiler, so nothing is compiled and the machine's own cache is untouched."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.formats import quantize

QUANTIZE = (
    "import sys, torch, warnings\n"
    "from lowbit import kernels\n"
    "from lowbit.formats import quantize\n"
    "warnings.simplefilter('always')\n"
    "q = quantize(torch.load(sys.argv[1]), 'fp4_e2m1', 'mx')\n"
    "torch.save(q.values, sys.argv[2])\n"
    "print(kernels.available(), kernels.build_error(), sep='\\n')\n"
)


def quantize_in_a_process(tmp_path: Path, cwd: Path | None = None, **env: str):
    """(the values of mxfp4 quantization of a tensor in a fresh process with ``env``, the same
    in this process, that process's stdout lines and stderr)."""
    x = torch.randn(16, 64)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run(
        [sys.executable, "-c", QUANTIZE, str(tmp_path / "x.pt"), str(tmp_path / "q.pt")],
        env={**os.environ, **env},
        cwd=cwd or tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = quantize(x, "fp4_e2m1", "mx").values
    return torch.load(tmp_path / "q.pt"), expected, done.stdout.splitlines(), done.stderr


def failing_compiler(tmp_path: Path) -> Path:
    """A C++ compiler that reports its version as the real one does and fails every compile with
    gcc's kind of message (a compile error, without the half minute of a real build)."""
    script = tmp_path / "bad-c++"
    script.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" -c "*) ;; *) exec c++ "$@";; esac\n'
        'echo "quantize.cpp:3:1: error: expected unqualified-id before numeric constant" >&2\n'
        "exit 1\n"
    )
    script.chmod(0o755)
    return script


def test_without_a_compiler_a_one_line_note_and_the_same_bits(tmp_path):
    """With no c++ on PATH, torch ran the build anyway, printed a page-long warning that "c++" is
    not PyTorch's compiler, and lowbit's note quoted the compile command (500 characters) instead
    of the reason."""
    (tmp_path / "bin").mkdir()
    values, expected, (loaded, error), err = quantize_in_a_process(
        tmp_path, PATH=str(tmp_path / "bin"), CXX="c++", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")
    )
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))
    assert loaded == "False"
    assert error == "RuntimeError: no C++ compiler: 'c++' ($CXX, default c++) is not on PATH"
    assert "!! WARNING" not in err
    note = next(line for line in err.splitlines() if "could not build" in line)
    assert f"({error}); using the PyTorch path (same results, slower)" in note
    assert "Fix: install a C++ compiler" in note


def test_a_build_folder_that_cannot_be_made_names_that_fix(tmp_path):
    """A file in the way of the build folder (or a read-only one): the fix is another folder, not
    the "install a C++ compiler" the note gave for every failure."""
    (tmp_path / "a-file").touch()
    values, expected, (loaded, error), err = quantize_in_a_process(
        tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "a-file" / "ext")
    )
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))
    assert loaded == "False" and error.startswith("NotADirectoryError:")
    assert "Fix: set TORCH_EXTENSIONS_DIR to a folder you can write" in err


@pytest.mark.parametrize(
    ("given", "cache"), [("", "cache/torch_extensions"), ("~/ext", "home/ext")], ids=repr
)
def test_torch_extensions_dir_builds_where_a_shell_user_means(tmp_path, given, cache):
    """torch joins TORCH_EXTENSIONS_DIR to the build folder's name as it is: an empty value put
    the build folder in the current directory (every directory compiled its own), and ``~/ext``
    made a folder named ``~`` there. Empty is the default cache; ``~`` is the home folder."""
    work = tmp_path / "work"
    work.mkdir()
    quantize_in_a_process(
        tmp_path,
        cwd=work,
        CXX=str(failing_compiler(tmp_path)),  # fails at once, wherever the build folder is
        TORCH_EXTENSIONS_DIR=given,
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    assert list(work.iterdir()) == []
    assert any(path.name.startswith("lowbit_kernels_") for path in (tmp_path / cache).rglob("*"))


def test_formats_refuses_an_empty_tensor_path(capsys):
    """``--tensor ""`` (an unset shell variable) printed the table of formats, as if no --tensor
    had been given."""
    assert main(["formats", "--tensor", ""]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "lowbit: error: --tensor: an empty path; fix: pass a .pt or .safetensors file\n"
    )


def test_formats_names_a_device_as_not_a_file(capsys):
    """/dev/null exists: "no such file" sent the user looking for a typo."""
    assert main(["formats", "--tensor", os.devnull]) == 2
    assert capsys.readouterr().err.startswith(
        f"lowbit: error: {os.devnull}: not a regular file (a device, pipe or socket); fix:"
    )


def test_formats_on_a_checkpoints_folder_names_its_last_checkpoint(tmp_path, capsys):
    """The fix for a folder of .pt files said to pass a .pt file "(a lowbit run's are in its
    checkpoints folder)", which is what the user had passed."""
    for step in (2, 4):
        torch.save({"step": step, "model": {"w": torch.randn(4, 8)}}, tmp_path / f"step-{step}.pt")
    assert main(["formats", "--tensor", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {tmp_path}: a folder, with no .safetensors or pytorch_model.bin file in "
        "it; fix: pass one of "
        f"its .pt files (the last: {tmp_path / 'step-4.pt'})\n"
    )
