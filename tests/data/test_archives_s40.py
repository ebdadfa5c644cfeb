"""Session 40: a tar archive of text files is refused as an archive, with the command that
unpacks it (its NUL padding was taken for a crashed log's: "delete them (tr -d '\\000')"); a
CoNLL file that is all the data is not told "or remove it"."""

import io
import tarfile

import pytest

from lowbit.data import load_corpus, read_conll, read_conll_documents
from lowbit.errors import UsageError


def write_tar(path, members: dict[str, bytes], fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


FORMATS = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_glob_that_matches_a_tar_of_text_files_is_refused_with_tar_xf(tmp_path, fmt):
    (tmp_path / "notes.txt").write_text("Some notes.\n\nMore notes.\n")
    text = ("A paragraph of the document.\n\n" * 50).encode()
    write_tar(tmp_path / "docs.tar", {f"doc{i}.txt": text for i in range(3)}, fmt)
    with pytest.raises(UsageError) as error:
        load_corpus(str(tmp_path / "*"))
    message = str(error.value)
    assert "docs.tar: a tar archive, not text" in message, message
    assert f"tar -xf {tmp_path / 'docs.tar'}" in message and "tr -d" not in message, message
    assert "\n" not in message


def test_a_tar_given_as_the_data_file_is_refused_even_holding_a_binary_member(tmp_path):
    path = tmp_path / "mixed.tar"
    write_tar(path, {"readme.txt": b"Read me.\n" * 300, "img.bin": bytes(range(256)) * 20}, 0)
    with pytest.raises(UsageError, match=r"mixed\.tar: a tar archive, not text; fix: .*tar -xf"):
        load_corpus(str(path))
    with pytest.raises(UsageError, match="a tar archive"):  # a glob does not leave it out
        load_corpus(str(tmp_path / "*.tar"))


@pytest.mark.parametrize("read", [read_conll, read_conll_documents])
@pytest.mark.parametrize(
    "data, found",
    [("EU B-ORG\nMünchen B-LOC\n".encode("cp1252"), "not UTF-8"), (b"EU\0 B-ORG\n", "NUL")],
)
def test_a_lone_conll_file_is_not_told_to_remove_itself(tmp_path, read, data, found):
    """`lowbit train --task ner --data eng.conll` reads one file: removing it is no fix."""
    path = tmp_path / "eng.conll"
    path.write_bytes(data)
    with pytest.raises(UsageError, match=found) as error:
        read(path)
    assert "remove it" not in str(error.value) and "fix: " in str(error.value)


def test_text_that_holds_ustar_at_byte_257_is_still_read(tmp_path):
    """A tar header's fields are NUL-padded: a text file with "custard" at byte 256 is no tar."""
    path = tmp_path / "recipes.txt"
    path.write_text("x" * 256 + "custard and more\n\nA second paragraph.\n")
    for spec in (path, tmp_path / "*.txt"):
        splits = load_corpus(str(spec)).splits.values()
        assert any("custard" in doc.text for docs in splits for doc in docs)
