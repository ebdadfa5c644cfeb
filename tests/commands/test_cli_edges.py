"""The command line at its edges: Ctrl-C, paths that cannot be written, paths with spaces."""

import contextlib
import io
import shlex

import pytest
import torch

from lowbit.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step nano run in a folder whose name has a space and a non-ASCII letter, and what
    `lowbit train` printed."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "text.txt"
    data.write_text("".join(f"paragraph {i}: some text.\n\n" for i in range(200)))
    out = root / "run one ü"
    flags = ["--model", "nano", "--data", str(data), "--steps", "1", "--seq-len", "16"]
    flags += ["--batch-size", "2", "--eval-batches", "1", "--out", str(out), "--quiet"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", *flags]) == 0
    return out, printed.getvalue()


@pytest.fixture
def run_dir(trained):
    return trained[0]


def test_ctrl_c_in_any_command_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Only train and compare caught Ctrl-C; the other commands printed a KeyboardInterrupt
    traceback."""
    tensor_file = tmp_path / "t.pt"
    torch.save(torch.ones(4), tensor_file)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "load", interrupted)  # Ctrl-C while the file is read
    try:
        status = main(["formats", "--tensor", str(tensor_file)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line with a traceback")
    assert status == 130
    assert capsys.readouterr().err == "lowbit: interrupted\n"


def test_an_out_below_a_file_is_one_line_error(run_dir, tmp_path, capsys):
    """`--out FILE/sub` ended in a NotADirectoryError traceback from mkdir."""
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder\n")
    assert main(["quantize", str(run_dir), "--to", "int8", "--out", str(blocker / "q")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"lowbit: error: --out {blocker / 'q'}: {blocker} is a file, not a folder; fix: choose "
        "another --out"
    ]


def test_printed_next_commands_quote_paths_with_spaces(trained, tmp_path, capsys):
    """`next: lowbit eval run one ü` split the folder name into three arguments when pasted."""
    run_dir, train_output = trained
    assert f"next: lowbit eval {shlex.quote(str(run_dir))} " in train_output
    out = tmp_path / "int8 model"
    capsys.readouterr()
    assert main(["quantize", str(run_dir), "--to", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"next: lowbit eval {shlex.quote(str(out))} " in printed
    command = next(line for line in printed.splitlines() if "next: lowbit eval" in line)
    assert shlex.split(command.split("next: ")[1])[:3] == ["lowbit", "eval", str(out)]


def test_a_file_where_a_run_keeps_a_folder_is_one_line_error(trained, tmp_path, capsys):
    """A resumed run whose tensorboard folder had become a file ended in a FileExistsError
    traceback from makedirs."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("not a folder\n")
    assert main(["train", "--resume", str(run), "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"lowbit: error: {run / 'tensorboard'}: File exists; fix: something is in the way at "
        "that path; move it away or choose another path"
    )
