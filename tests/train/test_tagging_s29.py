"""Session 29 hunt in the token- and image-classification tasks: their data, metrics and runs."""

import pytest
import torch

from lowbit.data.syntax_tags import IGNORE_INDEX
from lowbit.train.tasks import build_task
from tests.train.test_pretrained_transfer import save_tiny_bert

# Python's punctuation and identifiers split into several word pieces, as in a real WordPiece vocab
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "self", "if", "import",
         "(", ")", ":", ".", ",", "=", "_", "name", "##s", "x"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("pretrained-bert"), WORDS)


def test_builtin_task_fits_a_pretrained_encoders_word_pieces_in_seq_len(
    tiny_config, pretrained_bert, capsys
):
    """The built-in task packed --seq-len - 2 *words* per sentence whatever the encoder: with a
    pretrained tokenizer they were several times as many pieces, and 85% of the sentences lost
    their words past --seq-len (raising it raised the window too, so the warning's fix did not
    help). Sentences are now packed by word pieces."""
    config = tiny_config("token-classification", model=str(pretrained_bert), seq_len=32)
    task = build_task(config)
    # the sentences differ from an earlier run's: its --resume and eval see another fingerprint
    assert task.fingerprint == {"source": "syntax-tags(stdlib)", "packing": "word pieces"}
    for split in ("train", "validation"):
        _, mask, labels = task.encoded(split)
        words = torch.tensor([len(s.tokens) for s in task.sentences[split]])
        assert ((labels != IGNORE_INDEX).sum(1) == words).all()  # no word cut off
        assert mask.float().mean() > 0.6  # the windows are filled, not one line each
    assert "longer than --seq-len" not in capsys.readouterr().err


def test_bilou_tags_are_read_and_scored_as_iobes(tmp_path):
    """spaCy's BILOU tags (L- last, U- unit) were refused as invalid IOB tags; they are IOBES's E-
    and S- under other letters, and are now read and scored as those."""
    from lowbit.data import entity_f1, read_conll
    from lowbit.data.conll import conll_split_of, entity_spans

    path = tmp_path / "train.bilou"
    path.write_text("New B-LOC\nYork L-LOC\nis O\nAnn U-PER\n\nBob U-PER\n", encoding="utf-8")
    sentences = read_conll(path)
    assert sentences[0].tags == ["B-LOC", "L-LOC", "O", "U-PER"]
    assert entity_spans(sentences[0].tags) == {("LOC", 0, 2), ("PER", 3, 4)}
    iobes = [["B-LOC", "E-LOC", "O", "S-PER"], ["S-PER"]]
    predicted = [["B-LOC", "I-LOC", "O", "U-PER"], ["U-LOC"]]
    assert entity_f1([s.tags for s in sentences], predicted) == entity_f1(iobes, predicted)
    assert entity_f1(iobes, predicted)["correct"] == 2
    assert conll_split_of("dev.bilou") == "validation" == conll_split_of("dev.biluo")


def test_a_seq_len_past_the_encoders_positions_names_the_flag_and_its_limit(tmp_path, capsys):
    """The error said "fix: use a shorter one" without naming --seq-len or how short."""
    from lowbit.cli import main

    data = tmp_path / "ner.txt"
    data.write_text("".join(f"w{i} O\nx B-PER\n\n" for i in range(200)), encoding="utf-8")
    args = ["train", "--task", "token-classification", "--model", "tiny", "--data", str(data),
            "--seq-len", "600", "--steps", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "600 exceeds the encoder's 512 positions; fix: use --seq-len 512 or less" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
