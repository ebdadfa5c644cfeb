"""Session 34 hunt in the CoNLL reader: files joined with ``cat``, whitespace inside a tag."""

import re

import pytest

from lowbit.cli import main
from lowbit.data import read_conll, read_conll_documents
from lowbit.errors import UsageError

BOM = "\ufeff"


def test_files_joined_with_cat_each_with_a_byte_order_mark_read_as_their_documents(tmp_path):
    """``cat a.txt b.txt`` of two files a Windows editor saved puts b's byte-order mark at the
    start of a line: b's ``-DOCSTART-`` line was read as a word tagged O (a sentence of its own,
    and a.txt's and b.txt's sentences one document), and a word line's token began with it."""
    first = f"{BOM}-DOCSTART- -X- O\n\nEU B-ORG\nrejects O\n\n"
    second = f"{BOM}-DOCSTART- -X- O\n\nPeter B-PER\n\n"
    third = f"{BOM}Bonn B-LOC\n"
    path = tmp_path / "joined.txt"
    path.write_text(first + second + third, encoding="utf-8")
    documents = read_conll_documents(path)
    assert [[s.tokens for s in document] for document in documents] == [
        [["EU", "rejects"]],
        [["Peter"], ["Bonn"]],
    ]
    treebank = tmp_path / "joined.conllu"
    line = "1\tEU\teu\tPROPN\t_\t_\t0\troot\t_\t_\n\n"
    treebank.write_text(f"{BOM}# newdoc\n{line}{BOM}# newdoc\n{line}", encoding="utf-8")
    assert len(read_conll_documents(treebank)) == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("ner.txt", "EU B-ORG\u00a0\nrejects O\n", "'B-ORG\\xa0' holds a no-break space (U+00A0)"),
        ("ner.iob", "EU B-ORG\u200b\n", "'B-ORG\\u200b' holds a zero width space (U+200B)"),
        (
            "ud.conllu",
            "1\tEU\teu\tPROPN \t_\t_\t0\troot\t_\t_\n",
            "'PROPN ' holds a space (U+0020)",
        ),
    ],
)
def test_a_tag_holding_an_unseen_character_is_refused_not_read_as_a_label_of_its_own(
    tmp_path, name, text, message
):
    """A no-break or zero-width space pasted after a tag (a space typed after a treebank's
    UPOS) made ``B-ORG\\xa0`` a label beside ``B-ORG``: its words were trained and scored as
    another tag, printed alike in the per-label report."""
    path = tmp_path / name
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(
        UsageError, match=re.escape(f"{name}:1: the tag {message}") + ".*fix: remove it"
    ):
        read_conll(path)


def test_the_cli_refuses_a_tag_holding_a_no_break_space_in_one_line(tmp_path, capsys):
    data = tmp_path / "ner.txt"
    data.write_text("".join(f"w{i} O\nx B-PER\u00a0\n\n" for i in range(20)), encoding="utf-8")
    args = ["train", "--task", "token-classification", "--model", "tiny", "--data", str(data),
            "--steps", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"{data}:2: the tag 'B-PER\\xa0' holds a no-break space (U+00A0)" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
