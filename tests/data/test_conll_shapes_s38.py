"""Session 38: tagger data a user brings in other shapes than CoNLL text. JSON Lines (Hugging Face
datasets' ``to_json``: a record of tokens and tags per line) was read as 'TOKEN TAG' lines and
refused for the tag '"O"]}' with the list of valid tags as its fix; a folder of train.jsonl,
dev.jsonl, test.jsonl was told to rename them (then refused so); a glob, which causal-lm's --data
takes, was "no such CoNLL file or folder"."""

import json

import pytest

from lowbit.cli import main

RECORD = {"tokens": ["Ann", "ran"], "ner_tags": ["B-PER", "O"]}
JSON_FIX = (
    "JSON, not the CoNLL text that token classification reads; fix: write each word and its tag "
    "on a line of their own ('Ann B-PER'), a blank line between sentences, into a .txt file\n"
)


def _train(data, tmp_path, capsys) -> str:
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--steps", "1"]
    assert main([*argv, "--data", data, "--quiet", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("name", ["train.jsonl", "sentences.txt"])
def test_a_json_lines_file_is_refused_as_json(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(RECORD) for _ in range(20)) + "\n")
    assert _train(str(path), tmp_path, capsys) == f"lowbit: error: {path}: {JSON_FIX}"
    from lowbit.data import read_conll

    words = tmp_path / "words.txt"
    words.write_text("[ O\nAnn B-PER\n] O\n")  # a CoNLL line may open with a bracket
    assert read_conll(words)[0].tokens == ["[", "Ann", "]"]


def test_a_folder_of_json_lines_splits_is_refused_as_json(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dev.jsonl", "test.jsonl", "train.jsonl"):
        (data / name).write_text(json.dumps(RECORD) + "\n")
    assert _train(str(data), tmp_path, capsys) == f"lowbit: error: {data / 'dev.jsonl'}: {JSON_FIX}"


def test_a_glob_is_named_as_one(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dev.txt", "test.txt", "train.txt"):
        (data / name).write_text("Ann B-PER\nran O\n")
    glob = f"{data}/*.txt"
    assert _train(glob, tmp_path, capsys) == (
        f"lowbit: error: {glob}: a glob, which token-classification data is not read from; fix: "
        "give the folder that holds its train, dev and test files, or one CoNLL file\n"
    )


@pytest.mark.parametrize("name", ["data[1]", "dat?", "*.txt"])
def test_a_path_that_names_nothing_is_no_such_file_whatever_its_characters(tmp_path, capsys, name):
    """A mistyped path holding [ or ? (data[1], of a folder called data[l]) was called a glob,
    which misread it; one that matches nothing is told as the path it names, and that a glob is
    not read."""
    (tmp_path / "data[l]").mkdir()
    path = f"{tmp_path}/{name}"
    assert _train(path, tmp_path, capsys) == (
        f"lowbit: error: {path}: no such CoNLL file or folder; fix: check the data path (a glob "
        "is not read: give the folder that holds its train, dev and test files, or one CoNLL "
        "file)\n"
    )


@pytest.mark.parametrize(
    ("line", "fix"),
    [
        ("B-PER Ann", "write the token first and its tag last (Ann B-PER)"),
        ("O The", "write the token first and its tag last (The O)"),
        ("Ann b-per", "write the tag's prefix in capitals (B-per)"),
    ],
)
def test_a_tag_reversed_or_in_small_letters_is_named_so(tmp_path, line, fix):
    """Both were refused with the list of valid tags, which the user's tags were already of."""
    from lowbit.data import read_conll
    from lowbit.errors import UsageError

    path = tmp_path / "train.txt"
    path.write_text(f"{line}\nran O\n")
    with pytest.raises(UsageError) as refused:
        read_conll(path)
    assert str(refused.value).endswith(f"; fix: {fix}")


@pytest.mark.parametrize(
    ("names", "added"),
    [
        (("dev.txt", "train.txt"), "test.txt"),
        (("dev.conllu", "train.conllu"), "test.conllu"),
        (("en_ewt-ud-dev.conllu", "en_ewt-ud-train.conllu"), "en_ewt-ud-test.conllu"),
        (("eng.testa", "eng.train"), "eng.testb"),
        (("eng.train",), "eng.testa and eng.testb"),
    ],
)
def test_a_folder_without_a_test_file_is_told_to_add_one(tmp_path, capsys, names, added):
    """train.txt and dev.txt alone (a shared task's hidden test set) were told "rename the split
    files", which were named right. The file to add is named as those there are: "add test.txt"
    beside a treebank's files was then read as IOB text (not CoNLL-U), and beside CoNLL-2003's,
    was a name of another pattern than eng.train's."""
    data = tmp_path / "data"
    data.mkdir()
    for name in names:
        (data / name).write_text("Ann B-PER\nran O\n")
    err = _train(str(data), tmp_path, capsys)
    missing = "test" if len(names) == 2 else "validation or test"
    assert err.startswith(f"lowbit: error: {data}: no {missing} file among {', '.join(names)}; ")
    assert err.endswith(f"; fix: add {added}: sentences held out of the others\n")
