"""Data edge cases found by a bug hunt through the public interfaces (session 21)."""

import pytest

from lowbit.data.conll import read_conll, read_conll_documents

DOCUMENTS = """-DOCSTART- -X- -X- O

EU NNP B-ORG
rejects VBZ O

Peter NNP B-PER

-DOCSTART- -X- -X- O
-DOCSTART- -X- -X- O

Paris NNP B-LOC
"""


def test_conll_documents_keep_their_sentences_together(tmp_path):
    path = tmp_path / "eng.txt"
    path.write_text(DOCUMENTS)
    documents = read_conll_documents(path)
    assert [[s.tokens for s in doc] for doc in documents] == [
        [["EU", "rejects"], ["Peter"]],
        [["Paris"]],  # the empty document between two -DOCSTART- lines is no document
    ]
    assert read_conll(path) == [s for doc in documents for s in doc]


def test_a_conll_file_without_docstart_is_one_document(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("a O\n\nb B-X\n")
    assert [[s.tokens for s in doc] for doc in read_conll_documents(path)] == [[["a"], ["b"]]]


def test_a_json_file_of_json_lines_is_read_as_records_not_as_text(tmp_path):
    """Hugging Face datasets' ``to_json`` writes JSON Lines to ``.json`` files: read as text, the
    run trained on the JSON syntax ('{"text": "...') instead of the texts."""
    from lowbit.data import load_texts
    from lowbit.errors import UsageError

    (tmp_path / "rows.json").write_text('{"text": "first"}\n{"text": "second"}\n')
    docs = load_texts(tmp_path / "rows.json")
    assert [(d.name, d.text) for d in docs] == [("rows.json:1", "first"), ("rows.json:2", "second")]
    assert [d.text for d in load_texts(str(tmp_path / "*.json"))] == ["first", "second"]
    # json.dump of a list of records: one document per record
    (tmp_path / "array.json").write_text('[{"text": "first"},\n {"text": "second"}]\n')
    docs = load_texts(tmp_path / "array.json")
    assert [(d.name, d.text) for d in docs] == [
        ("array.json:#1", "first"),
        ("array.json:#2", "second"),
    ]
    (tmp_path / "bad.json").write_text('[{"text": "first"}, "second"]')
    with pytest.raises(
        UsageError,
        match=r"bad\.json: record 2: a string, not a JSON object; fix: one JSON array of objects",
    ):
        load_texts(tmp_path / "bad.json")
    # a glob over a code tree reads its package.json as text, as before; one asking for .json
    # files reads them as records, and says how it read one that is not
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "package.json").write_text('{\n  "name": "x"\n}\n')  # not JSON Lines
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    docs = load_texts(str(tmp_path / "app" / "*"))
    assert [d.name for d in docs] == ["main.py", "package.json"]
    with pytest.raises(UsageError, match=r"package\.json:1: .*\(a \.json file is read as JSON"):
        load_texts(str(tmp_path / "app" / "*.json"))


def test_a_folder_of_json_lines_names_the_glob_that_reads_them(tmp_path):
    """A folder is read for its text files: one holding only JSONL shards said 'no text found'
    and left the user to guess that a glob reads them."""
    from lowbit.data import load_texts
    from lowbit.errors import UsageError

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.jsonl").write_text('{"text": "first"}\n')
    pattern = (tmp_path / "shards" / "**" / "*.jsonl").as_posix()
    with pytest.raises(UsageError, match=r"only JSON Lines such as part-0\.jsonl; fix: ") as error:
        load_texts(tmp_path / "shards")
    assert str(error.value).endswith(f"--data '{pattern}'")
    assert [d.text for d in load_texts(pattern)] == ["first"]
