"""Which files of a CoNLL folder are its splits: real data files only, not backups or look-alikes."""

import pytest

from lowbit.data.conll import conll_folder_files, read_conll_folder
from lowbit.errors import UsageError


def _write(folder, names, sentence="Paris B-LOC\n"):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text(sentence)
    return folder


def test_backups_and_look_alikes_are_not_split_files(tmp_path):
    """An editor's backup holds the same sentences a second time, and ``values.txt`` is not
    validation data: a name-prefix rule read them all."""
    folder = _write(tmp_path / "conll", ["train.txt", "dev.txt", "test.txt"])
    junk = ["train.txt~", "train.txt.bak", ".train.txt.swp", "values.txt", "trainer.py"]
    _write(folder, junk, "Junk B-MISC\n")
    files = conll_folder_files(folder)
    assert {split: [p.name for p in paths] for split, paths in files.items()} == {
        "train": ["train.txt"],
        "validation": ["dev.txt"],
        "test": ["test.txt"],
    }
    assert all(s.tokens == ["Paris"] for split in read_conll_folder(folder).values() for s in split)


def test_split_files_by_their_usual_names(tmp_path):
    names = ["train-1.conll", "train-2.conll", "devel.tsv", "TEST", "eng.testb", "README.md"]
    files = conll_folder_files(_write(tmp_path / "conll", names))
    assert {split: [p.name for p in paths] for split, paths in files.items()} == {
        "train": ["train-1.conll", "train-2.conll"],
        "validation": ["devel.tsv"],
        "test": ["TEST", "eng.testb"],
    }


def test_a_folder_without_split_files_names_what_it_holds_and_what_it_takes(tmp_path):
    folder = _write(tmp_path / "conll", ["train.txt.bak", "values.txt", "test.txt"])
    with pytest.raises(UsageError) as caught:
        conll_folder_files(folder)
    message = str(caught.value)
    assert "no train or validation file" in message
    assert "train.txt.bak, values.txt" in message  # what it found
    assert "train.txt, dev.txt, test.txt" in message and ".testa" in message  # what it takes
    assert "\n" not in message


def test_lowbit_train_reads_the_split_files_only(tmp_path, capsys):
    """Through the command: a folder whose validation file is only ``values.txt`` is refused in
    one line naming the files found, before a run folder is made."""
    from lowbit.cli import main

    folder = _write(tmp_path / "conll", ["train.txt", "test.txt", "values.txt", "train.txt~"])
    out = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--data", str(folder), "--steps", "1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "no validation file" in error and "values.txt" in error and "fix:" in error
    assert not out.exists()


def test_a_file_of_two_splits_is_not_read_as_either(tmp_path):
    """BioBERT's NER folders hold ``train_dev.tsv``, the train and devel sentences together,
    beside ``train.tsv``: read as training data it put the validation sentences into training."""
    folder = _write(tmp_path / "conll", ["train.tsv"])
    _write(folder, ["devel.tsv"], "Bob\tB-PER\n")
    _write(folder, ["test.tsv"], "IBM\tB-ORG\n")
    _write(folder, ["train_dev.tsv", "dev-test.txt"], "Paris\tB-LOC\n\nBob\tB-PER\n")
    splits = read_conll_folder(folder)
    assert {split: [s.tokens for s in sentences] for split, sentences in splits.items()} == {
        "train": [["Paris"]],
        "validation": [["Bob"]],
        "test": [["IBM"]],
    }
