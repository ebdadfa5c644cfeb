"""Session 31: malformed training data met by `lowbit train --data` (causal-lm and
token-classification): what a user sees before anything trains."""

import json

import pytest

from lowbit.cli import main
from lowbit.data import load_texts, read_conll
from lowbit.errors import UsageError
from tests.data.test_data_hunt_s28 import TINY
from tests.data.test_data_hunt_s29 import paragraph, text_folder, warnings_of


def one_line_refusal(capsys, argv, out) -> str:
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()
    return err


def test_a_glob_reads_past_the_binary_files_it_matches_with_a_warning(tmp_path, capsys):
    """The folder's own warning advises ``folder/**/*`` for its .jsonl; that glob stopped the run
    at the folder's image ("not UTF-8 text (byte 0); fix: convert it to UTF-8"), or at a
    ``__pycache__`` a code folder holds. They are left out, named in one warning."""
    data = text_folder(tmp_path / "data")
    (data / "extra.jsonl").write_text(json.dumps({"text": paragraph(500)}) + "\n")
    (data / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (data / "__pycache__").mkdir()
    (data / "__pycache__" / "m.cpython-313.pyc").write_bytes(b"\xf3\r\r\n" + bytes(12) + b"\xe3")
    pattern = f"{data}/**/*"
    out = tmp_path / "run"
    assert main(["train", "--data", pattern, *TINY, "--out", str(out)]) == 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert "2 binary files not read (__pycache__/m.cpython-313.pyc, photo.png)" in line
    assert "fix:" in line
    names = [doc.name for doc in load_texts(pattern)]
    assert "extra.jsonl:1" in names and not any(n.endswith((".png", ".pyc")) for n in names)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
@pytest.mark.parametrize("script", ["latin", "cyrillic"])
def test_utf16_text_without_a_mark_in_a_glob_is_still_refused_as_such(tmp_path, encoding, script):
    """UTF-16 text holds NUL bytes as binary files do: it is text to convert, not to skip (text
    beyond ASCII, no NUL beside each letter, was skipped as binary)."""
    data = text_folder(tmp_path / "data")
    text = paragraph(7) if script == "latin" else "Привет, мир! Это текст на русском.\n" * 40
    (data / "notes.txt").write_bytes(text.encode(encoding))
    with pytest.raises(UsageError, match=r"notes\.txt: holds NUL bytes .*fix: convert"):
        load_texts(f"{data}/*.txt")


def jsonl_with_bad_records(path, bad: dict[int, str], count=10000):
    lines = [json.dumps({"text": f"record {i} " + paragraph(i % 50)}) for i in range(count)]
    for number, line in bad.items():
        lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_bad_records_of_a_jsonl_file_are_counted_in_one_refusal(tmp_path, capsys):
    """A corpus with null texts here and there was refused at the first (line 5000), and after
    the user dropped it, at the next: one run per bad record. The refusal counts them all."""
    bad = {5000: '{"text": null}', 6001: '{"other": 1}', 7002: '{"text": 5}'}
    data = jsonl_with_bad_records(tmp_path / "d.jsonl", bad)
    err = one_line_refusal(capsys, ["train", "--data", str(data), *TINY], tmp_path / "run")
    assert (
        f"{data}:5000: field 'text' is null, not a string "
        "(2 more of its 10000 lines fail too: 6001, 7002); fix: make it the text" in err
    )


def test_many_bad_records_are_counted_and_the_first_few_named(tmp_path):
    data = jsonl_with_bad_records(tmp_path / "d.jsonl", {n: "{}" for n in range(10, 30)}, 100)
    with pytest.raises(UsageError) as caught:
        load_texts(data)
    assert "d.jsonl:10: no field 'text' (found: none) (19 more of its 100 lines fail too: " in str(
        caught.value
    )
    assert "11, 12, 13, 14, 15, ...); fix: add it" in str(caught.value)


def test_the_bad_records_of_a_json_array_are_counted(tmp_path):
    data = tmp_path / "d.json"
    records = [{"text": paragraph(i)} for i in range(20)]
    records[3] = records[8] = {"body": "x"}
    data.write_text(json.dumps(records, indent=2))
    with pytest.raises(
        UsageError,
        match=r"d\.json: record 4: no field 'text' \(found: body\) \(1 more of its 20 "
        r"records fail too: 9\); fix:",
    ):
        load_texts(data)


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_object_holding_its_records_is_named(tmp_path, capsys, indent):
    """``{"version": 1, "data": [...records...]}``: on one line it was refused with "no field
    'text' (found: version, data); fix: ... --text-field", which no field name fixes; printed
    over several lines, with "invalid JSON" at line 1."""
    data = tmp_path / "squad.json"
    records = [{"text": paragraph(i)} for i in range(100)]
    data.write_text(json.dumps({"version": 1, "data": records}, indent=indent))
    err = one_line_refusal(capsys, ["train", "--data", str(data), *TINY], tmp_path / "run")
    assert f"{data}: one JSON object holding its records in an array ('data')" in err
    # the paths as given, so that the command works from where the user typed --data
    jsonl = data.with_suffix(".jsonl")
    assert f"fix: write them one per line (jq -c '.data[]' {data} > {jsonl})" in err


def test_a_json_file_of_one_record_on_one_line_is_still_json_lines(tmp_path):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"text": "hello", "tags": [{"a": 1}]}) + "\n")
    assert [(d.name, d.text) for d in load_texts(data)] == [("one.json:1", "hello")]
    data.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(UsageError, match=r"one\.json:1: no field 'text' \(found: body\)"):
        load_texts(data)


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]


def sentences(count, columns=("",)):
    """``count`` sentences of 5 words, each line the word, ``columns``, and its tag."""
    middle = " ".join(columns) + " " if columns != ("",) else ""
    return "".join(
        "".join(f"{WORDS[(i + j) % 8]} {middle}{'B-PER' if j == 0 else 'O'}\n" for j in range(5))
        + "\n"
        for i in range(count)
    )


def conll_folder(folder, train):
    folder.mkdir()
    (folder / "train.txt").write_text(train)
    for name in ("dev.txt", "test.txt"):
        (folder / name).write_text(sentences(10))
    return folder


def test_a_conll_token_written_with_a_space_is_warned_of(tmp_path, capsys):
    """``New York B-LOC`` among ``TOKEN TAG`` lines trained as the token ``New`` tagged B-LOC,
    ``York`` dropped without a word. One warning (the file is read twice in a run)."""
    train = sentences(20) + "New York B-LOC\nis O\n\n" + "Le Mans B-LOC\n\n"
    folder = conll_folder(tmp_path / "ner", train)
    out = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--data", str(folder), "--model", "tiny"]
    argv += ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    (line,) = warnings_of(capsys.readouterr().err)
    assert f"{folder / 'train.txt'}:121: 2 word lines of more columns than the file's 2 " in line
    assert "('New York B-LOC': 3)" in line and "fix: write each token without spaces" in line


def test_a_conll_2003_file_of_four_columns_and_docstart_lines_is_no_warning(tmp_path, capsys):
    path = tmp_path / "eng.train"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n\n" + sentences(3, ("NN", "I-NP")) + "\n\n-DOCSTART- -X- O\n\n"
    )
    assert len(read_conll(path)) == 3
    assert capsys.readouterr().err == ""


def test_a_glob_of_binary_files_only_is_refused_naming_them(tmp_path):
    """Every file left out as binary, the refusal was "no text found; fix: ... or a glob that
    matches files", though the glob matched files."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(UsageError, match=r"every file it matches is binary \(a\.png, b\.png\)"):
        load_texts(f"{folder}/*")
