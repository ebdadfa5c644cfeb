"""Session 42, a user's own data: `lowbit eval --data` of JSON records whose text is under
another field than the run's takes `--text-field` (it was refused with a fix naming that flag,
which eval did not take), and eval of a run whose data changed offers `--data`; encoding a
split's documents holds no second copy of their ids at the peak (the BPE tokenizer's
`encode_batch` of a whole split held every token's string and offsets: `lowbit train` on a
50 MB file peaked at 1,784 MB RSS, 697 MB now); a glob the shell expanded, a text file without
text and parts of speech in 'TOKEN TAG' lines are each refused in one line naming the fix."""

import json
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from lowbit.cli import main
from lowbit.data.conll import read_conll
from lowbit.data.tokenizers import ByteTokenizer

SEQ_LEN = 16
WORDS = ["alpha", "beta", "gamma", "delta"]


def _records(path, field: str, count: int) -> list[str]:
    texts = [" ".join(WORDS[(i + j) % 4] for j in range(8 + i % 5)) for i in range(count)]
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)))
    return texts


@pytest.fixture(scope="module")
def body_run(tmp_path_factory):
    """A causal-LM run trained on JSON records whose text is under ``body``."""
    folder = tmp_path_factory.mktemp("walk-s42")
    data = folder / "train.jsonl"
    _records(data, "body", 120)
    run = folder / "run"
    argv = ["train", "--data", str(data), "--text-field", "body", "--model", "nano"]
    argv += ["--seq-len", str(SEQ_LEN), "--batch-size", "2", "--steps", "1", "--quiet"]
    assert main([*argv, "--out", str(run)]) == 0
    return run


def test_eval_reads_new_records_under_the_field_given(body_run, tmp_path, capsys):
    """Every token of the file's records is scored (byte ids, one end-of-text between each two
    records), read from --text-field; without it the run's field is looked for, and the
    refusal's fix names --text-field, which eval now takes."""
    new = tmp_path / "new.jsonl"
    texts = _records(new, "text", 30)
    capsys.readouterr()
    argv = ["eval", str(body_run), "--data", str(new), "--json", "--quiet"]
    assert main([*argv, "--text-field", "text"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    ids = sum(len(t) for t in texts) + len(texts) - 1
    assert metrics["tokens"] == (ids - 1) // SEQ_LEN * SEQ_LEN
    assert metrics["data"] == str(new) and metrics["split"] is None
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no field 'body' (found: id, text)" in err and "--text-field" in err


def test_eval_text_field_needs_data_of_json_records(body_run, tmp_path, capsys):
    """Without --data the run's own data is read with its own field: refused in one line; with
    a plain text file it is warned of as ignored, and the file is evaluated."""
    capsys.readouterr()
    assert main(["eval", str(body_run), "--text-field", "text", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no --data is given" in err and "fix: give --data PATH, or drop --text-field" in err
    plain = tmp_path / "plain.txt"
    plain.write_text("gamma delta alpha beta " * 20)
    argv = ["eval", str(body_run), "--data", str(plain), "--text-field", "text", "--quiet"]
    assert main(argv) == 0
    assert "--text-field applies to JSONL data only" in capsys.readouterr().err


def _peak_traced(encode) -> tuple[int, np.ndarray]:
    """``encode()``'s result and the peak of the memory traced while it ran."""
    tracemalloc.start()
    try:
        ids = encode()
        return tracemalloc.get_traced_memory()[1], ids
    finally:
        tracemalloc.stop()


def test_byte_ids_are_made_without_an_int32_copy_of_each_document():
    """Each document's bytes go into the one int32 result: 4 bytes a token, plus the text's
    UTF-8 (each document made int32 first, then joined, held 8)."""
    texts = ["abcdefgh" * 2000] * 200  # 3.2 million bytes
    peak, ids = _peak_traced(lambda: ByteTokenizer().encode_documents(texts))
    eot = np.array([256], dtype=np.int32)
    parts = [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts]
    assert np.array_equal(ids, np.concatenate([p for part in parts for p in (part, eot)][:-1]))
    assert peak < 6 * len(ids)  # 8 bytes a token before


BPE_PEAK = """
import resource
from lowbit.data.tokenizers import train_bpe
texts = [" ".join(f"w{(i * 7 + j) % 97}x" for j in range(60)) for i in range(20000)]
tok = train_bpe(texts[:200], 400)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = tok.encode_documents(texts)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(ids), grown)
"""


def test_bpe_encodes_a_split_in_batches():
    """A split's documents are encoded in batches: the peak RSS grows by their ids, not by
    every token's Encoding (strings, offsets) held at once, about 128 bytes a token."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BPE_PEAK)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": ""},
        check=True,
    ).stdout.split()
    tokens, grown_kib = int(out[0]), int(out[1])
    assert tokens > 3_500_000  # 5.9M characters, over 5 batches of 2^20
    # ~32 bytes a token in batches of 2^20 characters, ~134 in one batch (session 42)
    assert grown_kib * 1024 < 64 * tokens


def test_a_glob_the_shell_expanded_is_named_with_its_quoted_form(tmp_path, capsys):
    """``--data docs/*.md`` unquoted reaches lowbit as a file and more paths: refused naming the
    glob to quote (it was "unrecognized argument; fix: see lowbit train --help")."""
    files = [tmp_path / f"d{i}.md" for i in range(3)]
    for path in files:
        path.write_text("some text\n")
    capsys.readouterr()
    assert main(["train", "--data", *map(str, files), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowbit: error: train {files[1]}: unrecognized argument after --data {files[0]}, 2 more "
        "paths (a glob the shell expanded?); fix: quote the glob, "
        f"--data '{tmp_path}/d*.md', for lowbit to read every file it matches, or give their folder"
    )


@pytest.mark.parametrize(
    ("content", "held"),
    [(" \n\t\n\n", "only whitespace (5 bytes)"), ("", "nothing (0 bytes)")],
)
def test_a_text_file_without_text_is_named_so(tmp_path, capsys, content, held):
    """It was "no text found; fix: point at UTF-8 .txt/.md/.py files", about such a file."""
    data = tmp_path / "notes.txt"
    data.write_text(content)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"lowbit: error: {data}: the file holds {held}, no text; fix: give a file of text\n"
    )
    assert not (tmp_path / "r").exists()


def test_parts_of_speech_in_token_tag_lines_are_given_the_command_to_a_treebank(tmp_path, capsys):
    """Tags without a B-/I- prefix ('dog NN') were refused with "use O, B-TYPE, I-TYPE", no fix
    for parts of speech; the refusal now gives the awk command that writes the file as CoNLL-U,
    which lowbit reads for its words tagged with their part of speech."""
    data = tmp_path / "train.txt"
    data.write_text("-DOCSTART- -X- O\n\nThe DT\ndog NN\n\n\nruns VBZ\nfast RB\n")
    capsys.readouterr()
    argv = ["train", "--task", "token-classification", "--data", str(data), "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowbit: error: {data}:3: invalid IOB tag 'DT'; fix: prefix entity")
    assert err.count("\n") == 1
    command = err.split("write the file as CoNLL-U and train on it, --data ", 1)[1]
    command = command.split(": ", 1)[1]
    subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    sentences = read_conll(tmp_path / "train.conllu")
    assert sentences == [(["The", "dog"], ["DT", "NN"]), (["runs", "fast"], ["VBZ", "RB"])]


def test_eval_of_a_run_whose_data_changed_offers_that_data_as_new(body_run, capsys):
    """The refusal's fix was only to restore the data; `--data` evaluates it as it is now."""
    data = body_run.parent / "train.jsonl"
    before = data.read_text()
    data.write_text(before + json.dumps({"body": "alpha alpha beta"}) + "\n")
    try:
        capsys.readouterr()
        assert main(["eval", str(body_run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.rstrip().endswith(
            "fix: restore the data the run read, or evaluate it as it is now (the whole file, "
            f"the records it trained on too): lowbit eval {body_run} --data {data}"
        )
        assert main(["eval", str(body_run), "--data", str(data), "--quiet"]) == 0
    finally:
        data.write_text(before)
