"""Session 36's walk of the inference commands: an --out no folder can be made in, or refused
only after loading; a quantized folder whose source run was moved."""

import shutil

import pytest

from lowbit.cli import main
from tests.infer.conftest import _train


@pytest.mark.parametrize(
    "command",
    [["quantize", "--to", "int8"], ["prune", "--sparsity", "0.5"], ["export"]],
)
@pytest.mark.parametrize("out", ["/proc/lowbit-s36", "/proc/lowbit-s36/q"])
def test_an_out_no_folder_can_be_made_in_is_one_line(lm_run, capsys, command, out):
    """/proc refuses a new folder with ENOENT, which the CLI keeps as a bug's traceback (a file
    lowbit should have written): the hidden folder beside --out was that traceback."""
    assert main([command[0], str(lm_run), *command[1:], "--out", out]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lowbit: error: --out {out}: no folder can be made in /proc (No such file or "
        "directory); fix: choose a folder you may write to\n"
    )


def test_eval_of_a_folder_whose_source_run_was_moved_says_so(lm_run, tmp_path, capsys):
    """The run moved (not deleted) was reported "gone"; the note names the path the folder
    records and how to get the comparison back, which moving the run back does."""
    run = shutil.copytree(lm_run, tmp_path / "run")
    folder = tmp_path / "q"
    assert main(["quantize", str(run), "--to", "int8", "--out", str(folder)]) == 0
    run.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0
    text = capsys.readouterr().out
    note = (
        f"the source run {run} that quantization.json records is not there, moved or deleted; "
        "to compare against it, move it back there"
    )
    assert f"this: the folder's model (kernels below); {note}\n" in text
    assert f"(no reference to compare against: {note})" in text and "gone" not in text
    (tmp_path / "moved").rename(run)
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0
    assert "reference: the source model in fp32" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [["quantize", "--to", "int8"], ["prune", "--sparsity", "0.5"], ["export"]],
)
def test_an_out_refused_is_refused_before_the_source_loads(lm_run, tmp_path, capsys, command):
    """An --out that is not empty was refused only after the model was loaded and quantized or
    pruned (minutes for a large one): here the run's checkpoint is unreadable, and the refusal
    of --out comes first."""
    run = shutil.copytree(lm_run, tmp_path / "run")
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.write_bytes(b"not a checkpoint")
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main([command[0], str(run), *command[1:], "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {out} exists and is not empty; fix: remove it, choose another --out, "
        "or pass --force\n"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_folder_reads_a_relative_data_path_with_its_run_moved(tmp_path, monkeypatch, capsys):
    """A run trained on a relative --data path: its folder's copied config.yaml held that path,
    which only the run's run.json resolves; with the run moved, `lowbit eval FOLDER` from another
    folder stopped on "corpus.txt: no such file", a path the user never gave it."""
    data = tmp_path / "data" / "corpus.txt"
    data.parent.mkdir()
    data.write_text("".join(f"paragraph {i}: the cat sat on the mat.\n\n" for i in range(300)))
    monkeypatch.chdir(data.parent)
    run = _train(tmp_path / "run", model="nano", data="corpus.txt", steps=1, seq_len=16)
    folder = tmp_path / "q"
    assert main(["quantize", str(run), "--to", "int8", "--out", str(folder)]) == 0
    run.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0
    assert "no reference to compare against: the source run" in capsys.readouterr().out
    assert main(["generate", str(folder), "--max-new-tokens", "2"]) == 0


def test_the_weight_only_int8_note_says_how_its_kernel_is_chosen(lm_run, tmp_path, capsys):
    """The note read "(kernel='int8pack' for the int8 one)": no flag of any command takes that,
    and it did not say where it goes (the Python API) or why it is not the default."""
    folder = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0
    assert (
        "kernels: int8 weights dequantized once, fp32 GEMM (faster on the CPUs measured than the "
        "int8-weight kernel, which lowbit.infer.set_kernel(model, 'int8pack') picks)\n"
    ) in capsys.readouterr().out
