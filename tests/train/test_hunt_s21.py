"""Trainer data edge cases found by a bug hunt through the public interfaces (session 21)."""

import pytest

from lowbit.errors import UsageError
from lowbit.train import TrainConfig
from lowbit.train.config import ignored_settings, resolve
from lowbit.train.tasks import conll_splits


def _conll_documents(path, documents, sentences=4):
    """A CoNLL file of ``documents`` -DOCSTART- blocks; every word names its document."""
    lines = []
    for doc in range(documents):
        lines += ["-DOCSTART- -X- -X- O", ""]
        for sentence in range(sentences):
            lines += [f"d{doc}s{sentence} B-LOC", f"d{doc} O", ""]
    path.write_text("\n".join(lines))
    return path


def test_a_single_conll_file_splits_by_document_not_by_sentence(tmp_path):
    """A document's sentences share names and phrases: split one by one, most validation
    documents also lent sentences to training, and validation scores came out too good."""
    splits = conll_splits(str(_conll_documents(tmp_path / "eng.txt", 120)))
    documents = {
        split: {sentence.tokens[1] for sentence in sentences} for split, sentences in splits.items()
    }
    assert all(documents.values())
    assert not documents["train"] & documents["validation"]
    assert not documents["train"] & documents["test"]
    assert not documents["validation"] & documents["test"]
    assert sum(len(s) for s in splits.values()) == 120 * 4  # every sentence kept, once


def test_too_few_conll_documents_for_a_split_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"too few documents \(3\) to fill a validation split"):
        conll_splits(str(_conll_documents(tmp_path / "eng.txt", 3, sentences=40)))
    # a single -DOCSTART- at the top: the file is split sentence by sentence, as before
    splits = conll_splits(str(_conll_documents(tmp_path / "one.txt", 1, sentences=120)))
    assert all(splits.values())


def _model_folder_with_tokenizer(folder):
    from lowbit.data import ByteTokenizer
    from lowbit.models import build_causal_lm

    build_causal_lm("nano", 257, seed=0).save_pretrained(folder)
    ByteTokenizer().save(folder)
    return folder


def test_tokenizer_flags_for_a_model_that_brings_its_tokenizer_are_named(tmp_path):
    model = str(_model_folder_with_tokenizer(tmp_path / "model"))
    config = TrainConfig(model=model, tokenizer="bpe", vocab_size=512, out=str(tmp_path / "r"))
    lines = ignored_settings(resolve(config))
    assert [line.split(" ")[0] for line in lines] == ["tokenizer", "vocab_size"]
    assert all("brings its own tokenizer (lowbit_tokenizer.json); ignored" in x for x in lines)
    config = TrainConfig(tokenizer="bpe", vocab_size=512, out=str(tmp_path / "r"))
    assert ignored_settings(resolve(config)) == []  # a named size: the BPE is trained


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "the run reads the built-in standard library"),
        ("texts", "is read for its .txt/.md/.py files (a glob such as"),
        ("texts/a.txt", "is read as paragraphs of text"),
        ("texts/a.jsonl", None),
        ("texts/*.jsonl", None),
    ],
)
def test_a_text_field_without_jsonl_data_is_named(tmp_path, data, reason):
    (tmp_path / "texts").mkdir()
    for name in ("a.txt", "a.jsonl"):
        (tmp_path / "texts" / name).write_text('{"body": "x"}\n')
    path = None if data is None else str(tmp_path / data)
    config = TrainConfig(data=path, text_field="body", out=str(tmp_path / "r"))
    lines = ignored_settings(resolve(config))
    if reason is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("text_field (--text-field) applies to")
        assert reason in lines[0] and lines[0].endswith("; ignored")


def test_documents_longer_than_the_tokenizers_limit_are_not_warned_about():
    """The trainer cuts the ids into --seq-len windows: transformers' warning that the sequence
    'will result in indexing errors' in the model was false."""
    import logging

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.train.tasks import HFTokenizer

    words = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", model_max_length=8)
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # its own handler's stream may be stale
    try:
        ids = HFTokenizer(fast).encode_documents(["a " * 20, "a"])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert ids.tolist() == [1] * 20 + [2, 1]
    assert not [message for message in said if "longer than the specified maximum" in message]


@pytest.mark.parametrize("flag", ["--data", "--out", "--model", "--text-field"])
def test_an_empty_path_or_name_is_refused_not_read_as_the_current_folder(
    tmp_path, capsys, monkeypatch, flag
):
    """``--data "$CORPUS"`` with the variable unset: as a path, "" is the current folder, whose
    files the run trained on (a token tagger read any train*/dev*/test* file there)."""
    from lowbit.cli import main

    monkeypatch.chdir(tmp_path)
    for i in range(200):
        (tmp_path / f"note{i}.txt").write_text(f"a note {i} " * 40)
    assert main(["train", flag, "", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    name = flag[2:].replace("-", "_")
    assert f"{name} is an empty string; fix: give a value, or drop {flag} for the default" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"note{i}.txt" for i in range(200))


def test_eval_of_a_run_whose_built_in_data_changed_names_the_built_in_corpus(tiny_config):
    """The built-in standard library differs between Python versions: eval said "its data None
    holds other contents"."""
    import json

    from lowbit.train import train
    from lowbit.train.evaluate import evaluate_run

    result = train(tiny_config(steps=1, eval_interval=1), quiet=True)
    info_path = result.run_dir / "run.json"
    info = json.loads(info_path.read_text())
    info["data_fingerprint"]["train"]["sha256"] = "0" * 64  # as another Python's stdlib reads
    info_path.write_text(json.dumps(info))
    with pytest.raises(UsageError, match=r"its data \(built-in\) holds other contents"):
        evaluate_run(result.run_dir)


def test_the_run_summary_shows_control_characters_of_the_sample_as_escapes(tmp_path):
    """A byte-level model samples any byte: ESC sequences and NUL went raw to the terminal."""
    from lowbit.train.trainer import RunResult

    result = RunResult(
        tmp_path, TrainConfig(), 1, "completed", {"loss": 5.0}, {"loss": 4.0}, 4.0, 1.0,
        "tokens", 0.1, 1.0, 1.0, 1.0, 0, 1.0, None,
        sample="def f():\n\tx = '\x1b[2J\x00é'\x1c\u202eab",
    )  # fmt: skip
    summary = result.summary()
    assert "    \tx = '\\x1b[2J\\x00é'\\x1c\\u202eab" in summary.split("\n")
    assert "\x1b" not in summary and "\x00" not in summary


def test_a_bpe_vocab_size_the_text_cannot_fill_is_warned_about(tiny_config, tmp_path, capsys):
    """BPE stops when the text holds no more merges: 100000 asked gave a few hundred ids, silently."""
    from lowbit.train.tasks import causal_lm_tokenizer

    config = tiny_config(tokenizer="bpe", vocab_size=100_000)

    class Corpus:
        def texts(self, split):
            return ["def add(a, b):\n    return a + b\n"] * 4

    tokenizer = causal_lm_tokenizer(config, None, Corpus)
    assert tokenizer.vocab_size < 1000
    err = capsys.readouterr().err
    assert f"BPE learned {tokenizer.vocab_size} ids, not the --vocab-size 100000 asked" in err


def test_eval_takes_a_checkpoint_by_step_number_or_file_name(tiny_config, capsys):
    """--checkpoint took only a path: "10" or "step-0000010.pt" said "no such checkpoint; fix:
    check the path" although the run had it."""
    from lowbit.cli import main
    from lowbit.train import train

    result = train(tiny_config(steps=2, eval_interval=1, save_interval=1, keep_last=2), quiet=True)
    run = str(result.run_dir)
    for name in ("1", "step-0000001.pt", str(result.run_dir / "checkpoints" / "step-0000001.pt")):
        assert main(["eval", run, "--checkpoint", name, "--max-batches", "1"]) == 0
        assert "step-0000001.pt (step 1)" in capsys.readouterr().out
    assert main(["eval", run, "--checkpoint", "7", "--max-batches", "1"]) == 2
    assert "7: no such checkpoint (the run has steps 1, 2); fix:" in capsys.readouterr().err


def test_a_stop_on_a_save_step_writes_that_checkpoint_once(tiny_config, monkeypatch):
    """The stop saved the step again right after its save: the time of a second save, and a
    moment with the new checkpoint removed before its copy was renamed in."""
    from lowbit.train import checkpoint
    from lowbit.train.trainer import Trainer

    saves = []
    save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saves.append(a[2]) or save(*a, **k))
    trainer = Trainer(tiny_config(steps=6, eval_interval=2, save_interval=2), quiet=True)

    def stop_at_step_2(t):
        t.stop_requested = t.step_idx == 2

    result = trainer.fit(on_step=stop_at_step_2)
    assert result.status == "interrupted" and result.steps == 2
    assert saves == [2] and result.checkpoint.name == "step-0000002.pt"


def test_a_trainer_that_has_trained_refuses_a_fresh_fit(tiny_config):
    """A second fit() on the same Trainer cleared the run folder, checkpoints included, trained
    no step and wrote a 'completed' run without a checkpoint."""
    from lowbit.train.trainer import Trainer

    trainer = Trainer(tiny_config(steps=2, eval_interval=2), quiet=True)
    result = trainer.fit()
    with pytest.raises(UsageError, match="already trained to step 2; fix: a new Trainer"):
        trainer.fit(overwrite=True)
    assert result.checkpoint.is_file()


def test_a_resume_on_other_data_names_the_data_before_the_batches(tiny_config, tmp_path):
    """A resume on changed data failed in the batches' saved state ("cannot resume batches:
    num_rows saved ... now ...") before the data check could name the cause."""
    from lowbit.train import train

    data = tmp_path / "text.txt"
    data.write_text("".join(f"paragraph {i}: some words here.\n\n" for i in range(300)))
    config = tiny_config(data=str(data), steps=2, eval_interval=1)
    train(config, quiet=True)
    data.write_text("".join(f"another {i}: more words.\n\n" for i in range(200)))
    with pytest.raises(UsageError, match="holds other contents than the run trained on"):
        train(tiny_config(data=str(data), steps=4, eval_interval=1), resume=True, quiet=True)


def test_a_resume_leaves_the_runs_tokenizer_files_as_they_are(tiny_config, tmp_path):
    """A resume rewrote the tokenizer it had just read, in place: a kill in that write left a
    torn tokenizer.json that no later resume could read (a BPE one cannot be rebuilt the same)."""
    import os

    from lowbit.train import train

    # a small text (the built-in corpus takes seconds to learn BPE from and to encode, twice)
    data = tmp_path / "text.txt"
    data.write_text(
        "".join(
            f"paragraph {i}: some words {i * 7 % 13} here, {i**2} more.\n\n" for i in range(300)
        )
    )
    config = tiny_config(data=str(data), tokenizer="bpe", vocab_size=300, steps=2, eval_interval=1)
    result = train(config, quiet=True)
    files = [p for p in (result.run_dir / "tokenizer").iterdir() if p.is_file()]
    for path in files:
        os.utime(path, (1_000_000, 1_000_000))
    resumed = train(
        tiny_config(data=str(data), tokenizer="bpe", vocab_size=300, steps=3, eval_interval=1),
        resume=True,
        quiet=True,
    )
    assert resumed.steps == 3
    assert all(path.stat().st_mtime == 1_000_000 for path in files)
