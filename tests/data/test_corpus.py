import hashlib
import json
import signal

import pytest

from lowbit.data.corpus import (
    SPLITS,
    Document,
    fingerprint,
    load_corpus,
    load_texts,
    split_documents,
    split_of,
    stdlib_documents,
)
from lowbit.errors import UsageError


def write_files(folder, count):
    for i in range(count):
        sub = folder / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"text number {i}\n")


def test_split_rule_matches_the_documented_hash_rule():
    for name in ("a.py", "json/decoder.py", "x.jsonl:3", "émoji.txt"):
        bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100
        expected = "train" if bucket < 90 else "validation" if bucket < 95 else "test"
        assert split_of(name) == expected


def test_split_is_disjoint_complete_and_independent_of_other_documents():
    docs = [Document(f"f{i}.txt", str(i)) for i in range(400)]
    splits = split_documents(docs)
    names = [d.name for split in SPLITS for d in splits[split]]
    assert sorted(names) == sorted(d.name for d in docs)  # every doc once, none twice
    assert all(len(splits[s]) > 0 for s in SPLITS)
    fewer = split_documents(docs[::2])
    for split in SPLITS:
        assert {d.name for d in fewer[split]} <= {d.name for d in splits[split]}


def test_stdlib_corpus_excludes_tests_and_splits_about_90_5_5():
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert "json/decoder.py" in names
    assert not any(
        part in {"test", "tests", "idlelib", "lib2to3", "site-packages"}
        for n in names
        for part in n.split("/")[:-1]
    )
    corpus = load_corpus()
    counts = {s: len(corpus.splits[s]) for s in SPLITS}
    assert counts["train"] > 0.8 * len(docs)
    assert 0 < counts["validation"] < 0.1 * len(docs)
    assert 0 < counts["test"] < 0.1 * len(docs)
    total = corpus.fingerprint["total"]
    assert total["files"] == len(docs)
    assert total["bytes"] == sum(len(d.text.encode()) for d in docs)
    assert sum(corpus.fingerprint[s]["files"] for s in SPLITS) == len(docs)


def test_fingerprint_stable_and_sensitive_to_content_and_names(tmp_path):
    write_files(tmp_path, 6)
    first = fingerprint(load_texts(tmp_path))
    assert fingerprint(load_texts(tmp_path)) == first
    assert first["files"] == 6
    (tmp_path / "d0" / "f0.txt").write_text("text number 0!\n")
    changed = fingerprint(load_texts(tmp_path))
    assert changed["sha256"] != first["sha256"]
    assert changed["bytes"] == first["bytes"] + 1
    (tmp_path / "d0" / "f0.txt").rename(tmp_path / "d0" / "g0.txt")
    assert fingerprint(load_texts(tmp_path))["sha256"] != changed["sha256"]


def test_folder_reads_only_text_suffixes_recursively(tmp_path):
    write_files(tmp_path, 4)
    (tmp_path / "d1" / "notes.md").write_text("# md")
    (tmp_path / "d1" / "code.py").write_text("x = 1")
    (tmp_path / "d1" / "image.png").write_bytes(b"\x89PNG")
    names = [d.name for d in load_texts(tmp_path)]
    assert names == sorted(["d0/f0.txt", "d1/f1.txt", "d2/f2.txt", "d0/f3.txt", "d1/notes.md",
                            "d1/code.py"])  # fmt: skip


def test_glob_names_are_relative_to_the_fixed_prefix(tmp_path):
    write_files(tmp_path, 5)
    docs = load_texts(str(tmp_path / "**" / "*.txt"))
    assert [d.name for d in docs] == sorted(f"d{i % 3}/f{i}.txt" for i in range(5))
    only = load_texts(str(tmp_path / "d1" / "*.txt"))
    assert [d.name for d in only] == ["f1.txt", "f4.txt"]


def test_single_text_file_becomes_paragraph_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("one\nstill one\n\n\ntwo\n\nthree")
    docs = load_texts(path)
    assert [(d.name, d.text) for d in docs] == [
        ("book.txt:1", "one\nstill one\n"),
        ("book.txt:5", "two\n"),
        ("book.txt:7", "three"),
    ]


def test_jsonl_records_and_custom_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "a"}) + "\n\n" + json.dumps({"body": "b"}) + "\n")
    docs = load_texts(path, text_field="body")
    assert [(d.name, d.text) for d in docs] == [("data.jsonl:1", "a"), ("data.jsonl:3", "b")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": 1}\n', r"data\.jsonl:2: field 'text' is a number, not a string"),
        (
            '{"text": null}\n',
            r"data\.jsonl:1: field 'text' is null, not a string; fix: .*--text-field",
        ),
        (
            '{"text": "ok"}\n{"other": "x"}\n',
            r"data\.jsonl:2: no field 'text' \(found: other\); fix: .*--text-field",
        ),
        ('["text"]\n', r"data\.jsonl:1: an array, not a JSON object; fix: one object per line"),
        ('{"text": "ok"}\n\n{broken\n', r"data\.jsonl:3: invalid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_texts(path)


def test_jsonl_splits_records_at_line_feeds_only_and_accepts_a_bom(tmp_path):
    # json.dumps leaves these unescaped inside strings; str.splitlines would cut records at them
    texts = ["line\u2028separator", "para\u2029graph", "next\x85line"]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())  # BOM, Windows line ends
    docs = load_texts(path)
    assert [(d.name, d.text) for d in docs] == [
        (f"data.jsonl:{n}", t) for n, t in enumerate(texts, 1)
    ]


def test_paragraphs_break_at_whitespace_lines_only(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\ufeffone\u2028\u2028still one\n\x0c\ntwo\x0cstill two\n", encoding="utf-8")
    docs = load_texts(path)
    assert [(d.name, d.text) for d in docs] == [
        ("book.txt:1", "one\u2028\u2028still one\n"),  # no BOM; U+2028 is no line end
        ("book.txt:3", "two\x0cstill two\n"),  # a form feed line (page break) ends a paragraph
    ]


def test_missing_empty_and_undecodable_data(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_texts(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no text found"):
        load_texts(tmp_path / "empty")
    with pytest.raises(UsageError, match="no text found"):
        load_texts(str(tmp_path / "*.nothing"))
    (tmp_path / "bad.txt").write_bytes(b"ok\xff")
    with pytest.raises(
        UsageError, match=r"bad\.txt: not UTF-8 text \(byte 0xff at offset 2, line 1\)"
    ):
        load_texts(tmp_path / "bad.txt")


def test_user_corpus_empty_split_is_a_usage_error(tmp_path):
    write_files(tmp_path, 1)
    corpus = load_corpus(str(tmp_path))
    only = next(s for s in SPLITS if corpus.splits[s])
    assert corpus.texts(only) == ["text number 0\n"]
    missing = next(s for s in SPLITS if not corpus.splits[s])
    with pytest.raises(UsageError, match=f"the {missing} split is empty"):
        corpus.split(missing)
    assert corpus.fingerprint["source"] == str(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"text": "cut emoji \\ud83d"}',
            r"data\.jsonl:2: field 'text' holds an unpaired surrogate",
        ),
        ("1" * 5000, r"data\.jsonl:2: invalid JSON \(a number with more digits"),
        ("[" * 100_000 + "]" * 100_000, r"data\.jsonl:2: invalid JSON \(nested too deeply\)"),
    ],
)
def test_jsonl_values_python_cannot_use_are_one_line_errors(tmp_path, line, message):
    """A lone surrogate escape decodes to a str that UTF-8 cannot encode; a long number or deep
    nesting makes json.loads raise other than JSONDecodeError: each is the line's error."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(UsageError, match=message):
        load_corpus(str(path)).fingerprint  # noqa: B018


def _give_up_after(seconds):
    def stop(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)


def test_a_file_reached_twice_through_symlinks_is_one_document(tmp_path):
    """A linked folder or file holds the same text under another name: it would land in several
    splits (validation text also trained on); a glob's ``**`` followed a looping link 40 deep,
    and two loops for hours."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "other").mkdir()
    (data / "sub" / "a.txt").write_text("alpha\n")
    (data / "b.txt").write_text("beta\n")
    (data / "sub" / "loop").symlink_to("..")
    (data / "other" / "loop").symlink_to("..")
    (data / "also_b.txt").symlink_to("b.txt")
    (data / "broken.txt").symlink_to("missing.txt")
    outside = tmp_path / "outside.txt"
    outside.write_text("gamma\n")
    (data / "linked.txt").symlink_to(outside)
    expected = ["also_b.txt", "linked.txt", "sub/a.txt"]  # the first name of each file
    assert [d.name for d in load_texts(data)] == expected
    _give_up_after(30)
    try:
        assert [d.name for d in load_texts(str(data / "**" / "*.txt"))] == expected
    finally:
        signal.alarm(0)


def test_folder_skips_hidden_files_and_folders_as_a_glob_does(tmp_path):
    """Dot folders hold copies (.ipynb_checkpoints) or tools' files (.venv, .git), and macOS
    writes binary '._name' files next to copied ones."""
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "._a.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("text\n")
    assert [d.name for d in load_texts(tmp_path)] == ["a.txt"]
    assert [d.name for d in load_texts(str(tmp_path / "**" / "*.txt"))] == ["a.txt"]


def test_an_empty_split_of_one_text_file_says_how_it_is_cut(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(500)))  # no blank line: one paragraph
    with pytest.raises(UsageError, match=r"split is empty.*blank line"):
        load_corpus(str(path)).split("validation")


def test_suffixes_are_read_in_any_case_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "A.TXT").write_text("upper case text")
    (tmp_path / "data" / "b.txt").write_text("lower case text")
    (tmp_path / "records.JSONL").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [d.name for d in load_texts(tmp_path / "data")] == ["A.TXT", "b.txt"]
    assert [d.text for d in load_texts(tmp_path / "records.JSONL")] == ["one", "two"]
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/data" in a config file: no shell expands it
    assert [d.name for d in load_texts("~/data")] == ["A.TXT", "b.txt"]
