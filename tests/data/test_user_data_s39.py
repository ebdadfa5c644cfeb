"""Session 39: a user's own odd data files through `lowbit train --data`: old Mac line ends, gzipped
text in a folder, a binary file named .txt, an unreadable file, comment lines and tag ids in a
CoNLL file, and JSON records whose text is inside an object or empty."""

import bz2
import gzip
import json
import re
import subprocess
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus
from lowbit.errors import UsageError

PARAGRAPHS = 300


def _paragraphs(count=PARAGRAPHS):
    return [f"paragraph {i} says this and that, and more of it" for i in range(count)]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_file_of_old_mac_line_ends_is_cut_into_its_paragraphs(tmp_path):
    """Cut at line feeds only, a file with carriage returns alone was one paragraph: the run
    stopped at "the validation split is empty", whose fix (a blank line between paragraphs) the
    file already followed."""
    path = tmp_path / "notes.txt"
    path.write_bytes("\r\r".join(_paragraphs()).encode("utf-8"))
    corpus = load_corpus(str(path))
    docs = [d for split in corpus.splits.values() for d in split]
    assert len(docs) == PARAGRAPHS
    assert corpus.split("validation") and corpus.split("test")
    assert {d.text.strip() for d in docs} == set(_paragraphs())
    # named by the line an editor shows them on (two lines a paragraph, the blank one between)
    assert sorted(int(d.name.split(":")[1]) for d in docs) == list(range(1, 2 * PARAGRAPHS, 2))


def _gzipped_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(_paragraphs(60)):
        if i % 3:
            (data / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        else:
            with gzip.open(data / f"doc{i:02d}.txt.gz", "wt", encoding="utf-8") as out:
                out.write(text)
    return data


def test_a_folders_compressed_text_files_are_named_with_the_command_that_unpacks_them(
    tmp_path, capsys
):
    """A folder read its .txt files and left its .txt.gz ones out without a word: the run
    trained on two thirds of the data."""
    data = _gzipped_folder(tmp_path)
    corpus = load_corpus(str(data))
    assert sum(len(docs) for docs in corpus.splits.values()) == 40
    (warning,) = corpus.warnings
    assert warning.startswith(f"{data}: 20 compressed files not read (doc00.txt.gz, doc03.txt.gz")
    assert warning in capsys.readouterr().err
    # the fix's command, run as printed, unpacks them beside themselves: all read, no warning
    command = warning.split("; fix: decompress them: ")[1]
    subprocess.run(["bash", "-c", command], check=True)
    corpus = load_corpus(str(data))
    assert sum(len(docs) for docs in corpus.splits.values()) == 60
    assert corpus.warnings == ()


def test_a_folder_of_compressed_text_only_is_refused_with_the_command(tmp_path, capsys):
    """It was "no text found; fix: point at UTF-8 .txt/.md/.py files", about a folder of them."""
    data = _gzipped_folder(tmp_path)
    for path in data.glob("*.txt"):
        path.unlink()
    assert (
        main(["train", "--data", str(data), "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    )
    err = _error(capsys)
    assert "holds none, only compressed ones (doc00.txt.gz" in err
    assert not (tmp_path / "r").exists()
    subprocess.run(["bash", "-c", err.split("; fix: decompress them: ")[1]], check=True)
    assert sum(len(docs) for docs in load_corpus(str(data)).splits.values()) == 20


def test_a_compressed_jsonl_file_is_refused_with_the_command_that_unpacks_it(tmp_path, capsys):
    path = tmp_path / "records.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps({"text": text}) + "\n" for text in _paragraphs())
    assert (
        main(["train", "--data", str(path), "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    )
    command = re.search(r"fix: .*: (gunzip -k \S+), and give the file it writes", _error(capsys))
    subprocess.run(["bash", "-c", command.group(1)], check=True)
    corpus = load_corpus(str(tmp_path / "records.jsonl"))
    assert sum(len(docs) for docs in corpus.splits.values()) == PARAGRAPHS


def test_a_binary_file_named_txt_is_refused_as_binary(tmp_path, capsys):
    """An image saved as .txt in a data folder was "not UTF-8 text (byte 0x89 ...); fix: convert
    it from the encoding it was written in ... iconv -f ENCODING", which no encoding does."""
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(_paragraphs(20)):
        (data / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    image = data / "scan.txt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert (
        main(["train", "--data", str(data), "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    )
    err = _error(capsys)
    assert err == (
        f"lowbit: error: {image}: a binary file (a NUL byte at offset 8), not text; fix: remove it"
    )


def test_comment_lines_in_a_conll_file_are_named_as_such(tmp_path, capsys):
    """``# sent_id = 0`` above each sentence (as CoNLL-U writes, and some NER sets copy) was
    "invalid IOB tag '0'; fix: use O, B-TYPE, I-TYPE", a fix that the tags already followed."""
    data = tmp_path / "ner"
    data.mkdir()
    for split in ("train", "dev", "test"):
        sentences = [f"# sent_id = {i}\nAnn B-PER\nsaw O\nRome B-LOC\n" for i in range(20)]
        (data / f"{split}.txt").write_text("\n".join(sentences), encoding="utf-8")
    argv = ["train", "--task", "token-classification", "--data", str(data), "--model", "tiny"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = _error(capsys)
    assert err.startswith(f"lowbit: error: {data / 'train.txt'}:1: invalid IOB tag '0'; ")
    assert "fix: remove the comment lines (those opening with #)" in err


def _nested(tmp_path):
    path = tmp_path / "records.jsonl"
    records = ({"id": i, "meta": {"lang": "en", "text": t}} for i, t in enumerate(_paragraphs()))
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_text_field_inside_an_object_is_read_by_its_dotted_name(tmp_path):
    """Hugging Face datasets' records nest fields (``flatten`` names them ``meta.text``): the
    text could not be named, ``--text-field meta.text`` was "no field 'meta.text'"."""
    corpus = load_corpus(str(_nested(tmp_path)), text_field="meta.text")
    docs = [d for split in corpus.splits.values() for d in split]
    assert sorted(d.text for d in docs) == sorted(_paragraphs())


def test_an_object_named_as_the_text_field_names_the_field_inside_it(tmp_path, capsys):
    path = _nested(tmp_path)
    argv = ["train", "--data", str(path), "--text-field", "meta", "--model", "nano"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert "name the text field with --text-field meta.lang (a field inside it)" in _error(capsys)
    try:
        load_corpus(str(path), text_field="meta.title")
    except UsageError as error:
        assert f"{path}:1: no field 'meta.title' (found: meta.lang, meta.text)" in str(error)
    else:
        raise AssertionError("a missing nested field was read")


def test_numeric_conll_tags_are_named_as_tag_ids(tmp_path, capsys):
    """A Hugging Face dataset's tokens and ``ner_tags`` ids written out ("EU 3") were "invalid IOB
    tag '3'; fix: use O, B-TYPE, I-TYPE", which did not say that the tags were numbers."""
    path = tmp_path / "ner.txt"
    path.write_text("EU 3\nrejects 0\nGerman 7\n\n" * 30, encoding="utf-8")
    argv = ["train", "--task", "token-classification", "--data", str(path), "--model", "nano"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = _error(capsys)
    assert err.startswith(
        f"lowbit: error: {path}:1: invalid IOB tag '3'; fix: write each tag's name"
    )


def test_records_whose_text_field_is_all_empty_name_the_field(tmp_path, capsys):
    """Records with an empty ``text`` beside the field that holds it were "no text found; fix:
    point at ... a JSONL file with a 'text' field", which the file was."""
    path = tmp_path / "records.jsonl"
    records = ({"text": "", "body": text} for text in _paragraphs())
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert (
        main(["train", "--data", str(path), "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    )
    assert _error(capsys) == (
        f"lowbit: error: {path}: the 'text' field of all {PARAGRAPHS} records is empty or "
        "whitespace; fix: name the field that holds the text with --text-field"
    )
    corpus = load_corpus(str(path), text_field="body")
    assert sum(len(docs) for docs in corpus.splits.values()) == PARAGRAPHS


def test_an_unreadable_file_is_refused_with_the_permission_fix(tmp_path, capsys, monkeypatch):
    """A data file without read permission was "cannot read (Permission denied); fix: check the
    path", a path that was right."""
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(_paragraphs(20)):
        (data / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    private = data / "doc05.txt"
    read_bytes = Path.read_bytes

    def denied(path):  # the tests run as root, whom permissions do not stop
        if path == private:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert (
        main(["train", "--data", str(data), "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    )
    assert _error(capsys) == (
        f"lowbit: error: {private}: cannot read (Permission denied); fix: make it readable "
        f"(chmod u+r {private}) or remove it"
    )


def test_a_conll_folder_of_compressed_split_files_is_refused_with_the_command(tmp_path, capsys):
    """Its ``train.txt.gz``, ``dev.txt.gz``, ``test.txt.gz`` were "no train or validation or test
    file among ...; fix: rename the split files", which names cannot mend."""
    data = tmp_path / "ner"
    data.mkdir()
    for split in ("train", "dev", "test"):
        with gzip.open(data / f"{split}.txt.gz", "wt", encoding="utf-8") as out:
            out.write("Ann B-PER\nsaw O\nRome B-LOC\n\n" * 20)
    argv = ["train", "--task", "token-classification", "--data", str(data), "--model", "tiny"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = _error(capsys)
    assert "its split files are compressed (dev.txt.gz, test.txt.gz, train.txt.gz)" in err
    subprocess.run(["bash", "-c", err.split("; fix: decompress them: ")[1]], check=True)
    assert main([*argv, "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "r")]) == 0


def test_nul_bytes_in_utf8_text_are_refused_with_the_command_that_deletes_them(tmp_path, capsys):
    """A log that a crash padded with NUL bytes was "as binary files and UTF-16 text do, not
    UTF-8 text; fix: convert it to UTF-8", which it already was."""
    path = tmp_path / "server.log"
    text = "\n\n".join(_paragraphs())
    cut = text.index("paragraph 5 ")
    path.write_bytes(text[:cut].encode() + b"\0" * 512 + text[cut:].encode())
    assert (
        main(["train", "--data", str(path), "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    )
    err = _error(capsys)
    assert err.startswith(f"lowbit: error: {path}: holds NUL bytes (byte {cut}, line 11), ")
    command = re.search(r"\((tr -d .*)\) and use that file in its place$", err)
    subprocess.run(["bash", "-c", command.group(1)], check=True)
    corpus = load_corpus(str(tmp_path / "server.clean.log"))
    assert sum(len(docs) for docs in corpus.splits.values()) == PARAGRAPHS


# Review R2 of the above (session 39)


def _text_folder(folder, count=20):
    folder.mkdir()
    for i, text in enumerate(_paragraphs(count)):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def _gzip(path, text):
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(text)


def test_a_glob_reads_past_a_compressed_file_once_it_is_unpacked(tmp_path, capsys):
    """``--data 'd1/*'`` matching ``z.txt.gz`` was "gzip-compressed; fix: gunzip -k d1/z.txt.gz,
    and give the file it writes", and after ``gunzip -k`` the same error again: the glob still
    matched the ``.gz``. Its fix, run, makes the same command read the data."""
    data = _text_folder(tmp_path / "d1")
    _gzip(data / "z.txt.gz", "the last document, compressed\n")
    spec = f"{data}/*"
    argv = ["train", "--data", spec, "--model", "nano", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = _error(capsys)
    assert err == (
        f"lowbit: error: {spec}: matches 1 compressed file (z.txt.gz), and lowbit reads plain "
        f"UTF-8 files; fix: decompress it: gunzip -k {data / 'z.txt.gz'}"
    )
    subprocess.run(["bash", "-c", err.split("; fix: decompress it: ")[1]], check=True)
    corpus = load_corpus(spec)
    docs = [d.name for split in corpus.splits.values() for d in split]
    assert len(docs) == 21 and "z.txt" in docs and "z.txt.gz" not in docs
    (warning,) = corpus.warnings
    assert warning.startswith(f"{spec}: 1 compressed file not read (z.txt.gz): ")
    assert "its unpacked file sits beside it, read in its place" in warning
    assert warning in capsys.readouterr().err


def test_a_glob_of_compressed_files_alone_names_the_glob_of_their_unpacked_files(tmp_path):
    """``--data 'd1/*.gz'`` does not match the files that unpacking writes: its fix says which
    glob does, and, unpacked, the glob is refused with that one rather than read as nothing."""
    data = tmp_path / "d1"
    data.mkdir()
    for i, text in enumerate(_paragraphs(3)):
        _gzip(data / f"doc{i}.txt.gz", text)
    try:
        load_corpus(f"{data}/*.gz")
    except UsageError as error:
        message = str(error)
    else:
        raise AssertionError("compressed files were read")
    command, then = message.split("; fix: decompress them: ")[1].split(", then ")
    assert then == f"--data '{data}/*'"
    subprocess.run(["bash", "-c", command], check=True)
    try:
        load_corpus(f"{data}/*.gz")
    except UsageError as error:
        assert str(error).endswith(f"; fix: --data '{data}/*'"), error
    else:
        raise AssertionError("a glob of compressed files was read")
    assert sum(len(docs) for docs in load_corpus(f"{data}/*").splits.values()) == 3


def _packed_folder(tmp_path, count):
    """A folder of ``count`` gzipped text files, a bzip2 one, one gzipped beside its unpacked
    file, a hidden folder's and a tar archive: the last three are not the folder's to unpack."""
    data = _text_folder(tmp_path / "d3", 5)
    for i in range(count):
        _gzip(data / f"packed{i}.txt.gz", f"packed document {i}\n")
    (data / "c.txt.bz2").write_bytes(bz2.compress(b"a bzip2 document\n"))
    _gzip(data / "doc00.txt.gz", "an older copy of doc00\n")
    (data / ".cache").mkdir()
    _gzip(data / ".cache" / "h.txt.gz", "hidden\n")
    _gzip(data / "archive.tar.gz", "not a text file\n")
    return data


@pytest.mark.parametrize("count", [2, 8])
def test_a_folders_unpack_command_unpacks_the_files_it_names(tmp_path, count):
    """ "find d3 -name '*.gz' -exec gunzip -k {} + && find ... bunzip2 -k" stopped at the
    ``doc00.txt.gz`` beside ``doc00.txt`` (gunzip: "already exists"), so no ``.bz2`` was
    unpacked, and unpacked the hidden folder's and the tar archive's files too."""
    data = _packed_folder(tmp_path, count)
    (warning,) = load_corpus(str(data)).warnings
    assert f"{count + 1} compressed files not read" in warning
    subprocess.run(["bash", "-c", warning.split("; fix: decompress them: ")[1]], check=True)
    corpus = load_corpus(str(data))
    assert corpus.warnings == ()
    assert sum(len(docs) for docs in corpus.splits.values()) == 5 + count + 1
    assert (data / "doc00.txt").read_text() == _paragraphs(1)[0]  # not overwritten
    assert not (data / ".cache" / "h.txt").exists() and not (data / "archive.tar").exists()


LOG = b"2026-01-01 INFO service started ok\n" * 3000


@pytest.mark.parametrize("padding", ["end", "start"])
def test_a_nul_padded_log_gets_the_same_fix_alone_and_in_a_glob(tmp_path, capsys, padding):
    """A log padded with NULs past its first 8000 bytes was "as binary files and UTF-16 text
    do; fix: convert it to UTF-8" (ASCII reads as printable UTF-16); padded within them, a glob
    left it out as "binary ... they hold no text", while alone it got the ``tr -d`` fix."""
    data = _text_folder(tmp_path / "logs")
    log = data / "service.log"
    log.write_bytes(LOG + b"\0" * 4096 if padding == "end" else LOG[:70] + b"\0" * 64 + LOG[70:])
    first = log.read_bytes().index(0)
    for spec, or_else in ((log, ""), (f"{data}/*", "; or remove it")):
        argv = ["train", "--data", str(spec), "--steps", "1", "--model", "nano"]
        assert main([*argv, "--out", str(tmp_path / "r")]) == 2
        err = _error(capsys)
        assert err.startswith(f"lowbit: error: {log}: holds NUL bytes (byte {first}, "), err
        assert err.endswith(f" and use that file in its place{or_else}"), err
    subprocess.run(["bash", "-c", re.search(r"\((tr -d .*)\)", err).group(1)], check=True)
    assert (data / "service.clean.log").read_bytes() == LOG


def test_a_file_that_is_all_the_data_is_not_to_be_removed(tmp_path, capsys, monkeypatch):
    """``--data img.txt`` (a PNG) was "fix: remove it", and an unreadable ``--data notes.txt``
    "... or remove it": the fix for the one file of the data is a text file in its place."""
    image = tmp_path / "img.txt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(_paragraphs()), encoding="utf-8")
    records = tmp_path / "records.jsonl"
    records.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    read_bytes = Path.read_bytes

    def denied(path):  # the tests run as root, whom permissions do not stop
        if path == notes:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    fixes = {
        image: "give a UTF-8 text file",
        records: "give a UTF-8 text file",
        notes: f"make it readable (chmod u+r {notes})",
    }
    for path, fix in fixes.items():
        argv = ["train", "--data", str(path), "--model", "nano", "--out", str(tmp_path / "r")]
        assert main(argv) == 2
        assert _error(capsys).endswith(f"; fix: {fix}")


@pytest.mark.parametrize("comment", ["# newdoc", "#newdoc"])
def test_every_conll_comment_line_is_named_as_such(tmp_path, capsys, comment):
    """``# newdoc`` (two columns) was "invalid IOB tag 'newdoc'; fix: use O, B-TYPE, I-TYPE",
    and ``#newdoc`` "one column; fix: write 'TOKEN TAG'"."""
    path = tmp_path / "ner.txt"
    path.write_text(f"{comment}\nAnn B-PER\nsaw O\nRome B-LOC\n\n" * 30, encoding="utf-8")
    argv = ["train", "--task", "token-classification", "--data", str(path), "--model", "nano"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert "fix: remove the comment lines (those opening with #)" in _error(capsys)


def test_a_conll_tag_of_minus_100_is_named_as_the_ignore_index(tmp_path, capsys):
    """Word pieces labelled -100 (a tokenized set's labels written out) were "invalid IOB tag
    '-100'; fix: use O, B-TYPE, I-TYPE": not seen as a number."""
    path = tmp_path / "ner.txt"
    path.write_text("Ann B-PER\n##e -100\nsaw O\n\n" * 30, encoding="utf-8")
    argv = ["train", "--task", "token-classification", "--data", str(path), "--model", "nano"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = _error(capsys)
    assert err.startswith(f"lowbit: error: {path}:2: invalid IOB tag '-100'; fix: write each ")
    assert "-100 is the label that tokenized data gives the word pieces" in err


def test_a_glob_of_records_whose_text_fields_are_all_empty_names_the_field(tmp_path, capsys):
    """Only one file of them got "the 'text' field of all N records is empty"; a glob of such
    files was "no text found; fix: point at ... a JSONL file with a 'text' field"."""
    data = tmp_path / "ej"
    data.mkdir()
    for part in range(3):
        records = ({"text": " ", "body": text} for text in _paragraphs(10))
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (data / f"part{part}.jsonl").write_text(lines, encoding="utf-8")
    spec = f"{data}/*.jsonl"
    assert main(["train", "--data", spec, "--model", "nano", "--out", str(tmp_path / "r")]) == 2
    assert _error(capsys) == (
        f"lowbit: error: {spec}: the 'text' field of all 30 records is empty or whitespace; fix: "
        "name the field that holds the text with --text-field"
    )


def test_a_zip_archive_a_glob_matches_is_refused_with_its_unzip(tmp_path):
    """A zip holds files under names of its own, so no unpacked file sits beside it: a glob
    left it out as one that had ("fix: none needed"), its text silently not trained on."""
    import zipfile

    (tmp_path / "plain.txt").write_text("plain text\n" * 300)
    with zipfile.ZipFile(tmp_path / "books.zip", "w") as archive:
        archive.writestr("inner.txt", "zipped text\n" * 300)
    with pytest.raises(UsageError, match=r"books\.zip: zip-compressed.*unzip"):
        load_corpus(str(tmp_path / "*"))
