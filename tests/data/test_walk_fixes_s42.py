"""Session 42, review R5 of 7d593ca: the fixes that the refusals of parts of speech in 'TOKEN TAG'
lines, of eval on changed data, of a glob the shell expanded and of a file without text name
work as printed."""

import shlex
import subprocess

import pytest

from lowbit.cli import main
from lowbit.data.conll import read_conll_documents, read_conll_folder

POS = "-DOCSTART- -X- O\r\n\r\nThe DT\r\ndog NN\r\n\r\n-DOCSTART- -X- O\r\n\r\nruns VBZ\r\n"


def _refused_fix(argv, capsys) -> tuple[str, str]:
    """The --data a POS refusal names and the command it gives."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    data, command = err.split("train on it, --data ", 1)[1].split(": ", 1)
    return data, command


def test_pos_file_of_crlf_lines_becomes_a_treebank_of_its_documents(tmp_path, capsys):
    """The awk command dropped -DOCSTART- (documents lost) and kept a CRLF file's CR (tags
    'DT\\r', blank lines as words); the fix now names the new file to train on."""
    data = tmp_path / "tags.txt"
    data.write_bytes(POS.encode())
    (tmp_path / "tags.conllu").write_text("taken\n")
    argv = ["train", "--task", "token-classification", "--data", str(data), "--steps", "1"]
    new, command = _refused_fix(argv, capsys)
    assert new == str(tmp_path / "tags.2.conllu")
    subprocess.run(command, shell=True, check=True, executable="/bin/bash")
    assert read_conll_documents(new) == [[(["The", "dog"], ["DT", "NN"])], [(["runs"], ["VBZ"])]]


def test_pos_folder_becomes_a_new_folder_of_treebank_splits(tmp_path, capsys):
    """A split file's train.conllu beside its train.txt was a second train file, the .txt still
    refused (each try named train.2.conllu, train.3.conllu...): each split goes to a new folder."""
    folder = tmp_path / "my pos"
    folder.mkdir()
    for name in ("train.txt", "dev.txt", "test.txt"):
        (folder / name).write_bytes(POS.encode())
    argv = ["train", "--task", "token-classification", "--data", str(folder), "--steps", "1"]
    new, command = _refused_fix(argv, capsys)
    assert new == repr(str(tmp_path / "my pos-conllu"))  # shell-quoted
    subprocess.run(command, shell=True, check=True, executable="/bin/bash")
    splits = read_conll_folder(tmp_path / "my pos-conllu")
    assert (
        splits["train"] == splits["test"] == [(["The", "dog"], ["DT", "NN"]), (["runs"], ["VBZ"])]
    )
    assert len(read_conll_documents(tmp_path / "my pos-conllu" / "dev.conllu")) == 2


def test_eval_of_changed_glob_data_offers_it_shell_quoted(tmp_path, capsys):
    """The fix printed ``--data /a folder/*.txt`` bare: the shell expanded the glob (or split
    the path at its space). Printed quoted, the command evaluates the data as it is now."""
    folder = tmp_path / "my data"
    folder.mkdir()
    for i in range(120):  # documents enough for a validation and a test split
        (folder / f"part{i}.txt").write_text("alpha beta gamma delta " * (4 + i % 5))
    glob, run = str(folder / "*.txt"), str(tmp_path / "run")
    argv = ["train", "--data", glob, "--model", "nano", "--seq-len", "16", "--batch-size", "2"]
    assert main([*argv, "--steps", "1", "--quiet", "--out", run]) == 0
    (folder / "part3.txt").write_text("delta gamma beta alpha " * 9)
    capsys.readouterr()
    assert main(["eval", run, "--quiet"]) == 2
    err = capsys.readouterr().err
    command = err.rstrip().split("or evaluate it as it is now: ", 1)[1]
    assert command == f"lowbit eval {shlex.quote(run)} --data {shlex.quote(glob)}"
    assert main([*shlex.split(command)[1:], "--quiet"]) == 0


def _expanded(argv, capsys) -> str:
    capsys.readouterr()
    assert main(["train", "--data", *map(str, argv), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_a_shell_expanded_glob_is_named_only_where_one_matches_those_files(tmp_path, capsys):
    """The glob offered was the files' folder and extension, 'd/*.txt' for d/train_1.txt and
    d/train_2.txt, which reads d/valid.txt too; 'GLOB' where they had no one extension; quoted
    by hand, not for the shell (a path with a quote or a space)."""
    folder = tmp_path / "my d"
    folder.mkdir()
    for name in ("train_1.txt", "train_2.txt", "valid.txt", "notes.md"):
        (folder / name).write_text("some text\n")
    err = _expanded([folder / "train_1.txt", folder / "train_2.txt"], capsys)
    pattern = shlex.quote(f"{folder}/train_*.txt")
    assert f"fix: quote the glob, --data {pattern}, for lowbit to read every file" in err
    err = _expanded([folder / "notes.md", folder / "valid.txt"], capsys)  # no glob of just these
    assert "(a glob the shell expanded?); fix: quote the glob you typed for lowbit" in err


def test_a_folder_after_the_data_file_is_no_expanded_glob(tmp_path, capsys):
    """``--data a.txt runs/`` (--out forgotten before a folder) was taken for a glob."""
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "runs").mkdir()
    err = _expanded([tmp_path / "a.txt", tmp_path / "runs"], capsys)
    assert "glob" not in err and "unrecognized argument; fix: see lowbit train --help" in err


@pytest.mark.parametrize(
    ("name", "content", "held"),
    [
        ("records.json", b"[]", "an empty JSON array (2 bytes)"),  # was "only whitespace"
        ("notes.txt", b"\xef\xbb\xbf", "only a byte-order mark (3 bytes)"),  # was "whitespace"
    ],
)
def test_a_file_without_text_is_named_for_what_it_holds(tmp_path, capsys, name, content, held):
    data = tmp_path / name
    data.write_bytes(content)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"lowbit: error: {data}: the file holds {held}, no text; fix: give a file of text\n"
    )


def test_files_without_text_are_counted_as_files_not_records(tmp_path, capsys):
    """A JSONL file of three empty records and a blank text file were "all 4 files"."""
    (tmp_path / "a.jsonl").write_text('{"text": " "}\n{"text": ""}\n{"text": ""}\n')
    (tmp_path / "b.txt").write_text("  \n")
    spec = str(tmp_path / "*")
    capsys.readouterr()
    assert main(["train", "--data", spec, "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert f"{spec}: all 2 files it reads hold only whitespace" in capsys.readouterr().err
