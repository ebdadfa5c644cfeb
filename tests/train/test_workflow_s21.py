"""Classification workflows chained through the public interfaces (train -> resume -> eval ->
compare -> quantize), bugs found by a bug hunt in session 21."""

import pytest

from lowbit.errors import UsageError


def test_an_encoder_folder_without_tokenizer_files_is_refused_in_one_line(tmp_path):
    """A config-only folder got a tokenizer of the special tokens alone from transformers (no
    error): every word was [UNK] and the tagger trained on the tag frequencies, silently."""
    from transformers import BertConfig

    from lowbit.models import load_encoder_tokenizer

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(
        UsageError, match=r"no tokenizer files .* fix: save the encoder's tokenizer"
    ):
        load_encoder_tokenizer(str(tmp_path))


ENCODER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def _saved_tagger(folder, labels):
    """A BERT tagger saved with a head of ``labels`` whose rows (bias included) are told apart."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=50, intermediate_size=64, num_labels=len(labels), **ENCODER)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    torch.nn.init.normal_(model.classifier.bias)
    model.save_pretrained(folder)
    return model


def test_a_saved_head_of_as_many_other_tags_is_replaced_not_loaded_row_for_row(tmp_path):
    """A CoNLL tagger's head (O, B-PER, I-PER) fine-tuned on data tagged O, B-LOC, B-PER was kept
    as it was: its trained B-PER row scored B-LOC and its I-PER row B-PER."""
    import torch

    from lowbit.models import build_model

    saved = _saved_tagger(tmp_path, ["O", "B-PER", "I-PER"])
    model = build_model("token-classification", str(tmp_path), labels=["O", "B-LOC", "B-PER"])
    assert torch.equal(model.classifier.bias, torch.zeros(3))  # BERT's fresh head
    assert not torch.equal(model.classifier.weight, saved.classifier.weight)
    assert model.config.id2label == {0: "O", 1: "B-LOC", 2: "B-PER"}
    # a head whose labels were never named (LABEL_0, ...) is kept as it is
    saved = _saved_tagger(tmp_path, ["LABEL_0", "LABEL_1"])
    model = build_model("token-classification", str(tmp_path), labels=["O", "B-X"])
    assert torch.equal(model.classifier.bias, saved.classifier.bias)


def _conll_folder(folder, sentences=24):
    """train/dev/test CoNLL files of a few tags (PER spans of two words, LOC of one)."""
    folder.mkdir(parents=True)
    words = [("Ann", "B-PER"), ("Lee", "I-PER"), ("in", "O"), ("Rome", "B-LOC"), ("ran", "O")]
    for name in ("train.txt", "dev.txt", "test.txt"):
        lines = []
        for i in range(sentences):
            lines += [f"{w} {t}" for w, t in words[i % 3 :]] + [""]
        (folder / name).write_text("\n".join(lines))
    return folder


TAGGER = {
    "task": "token-classification",
    "model": "tiny",
    "seq_len": 12,
    "batch_size": 4,
    "steps": 4,
    "eval_interval": 2,
    "eval_batches": 1,
}


def test_compare_resumes_an_interrupted_run_of_relative_data(tmp_path, monkeypatch):
    """An interrupted study on --data given relative to the working folder never resumed: the
    trainer compared the checkpoint's data as the absolute path the run recorded with the study's
    relative one and refused ("cannot resume with data 'data'")."""
    import json

    from lowbit.report import compare, make_study

    monkeypatch.chdir(tmp_path)
    _conll_folder(tmp_path / "data")
    study = make_study("fp32", {**TAGGER, "data": "data"}, seeds=1, out="study")
    compare(study, plots=False, log=lambda line: None)
    run = tmp_path / "study" / "runs" / "fp32" / "seed-0"
    finished = json.loads((run / "compare.json").read_text())
    (run / "compare.json").unlink()  # as a study interrupted after the checkpoint of step 2
    (run / "checkpoints" / "step-0000004.pt").unlink()
    result = compare(study, plots=False, log=lambda line: None)
    record = result.results["runs"]["fp32"][0]
    assert record["resumed"] and record["final_metrics"] == finished["final_metrics"]
    again = compare(study, plots=False, log=lambda line: None)  # the finished run is reused
    assert again.reused == [("fp32", 0)]


def test_a_compare_report_shows_tags_with_a_bar_or_dollar_signs(tmp_path):
    """A tag "B-ORG|GOV" split its cell of the per-label table (every later column shifted), and
    one with "$...$" (read as matplotlib's mathtext) ended the study in a traceback after
    training."""
    import json
    import re

    from lowbit.report import compare, make_study
    from lowbit.report.markdown import write_markdown

    data = _conll_folder(tmp_path / "data")
    for path in data.iterdir():
        text = path.read_text().replace("B-PER", "B-ORG|GOV").replace("I-PER", "I-ORG|GOV")
        path.write_text(text.replace("B-LOC", r"B-$\foo$"))
    settings = {**TAGGER, "data": str(data), "steps": 2}
    result = compare(make_study("fp32,bf16-pure", settings, seeds=1, out=tmp_path / "s"))
    assert (result.report_dir / "per_label.png").is_file()
    # the table lists only labels that dropped (two steps may drop none): the tags' accuracy as
    # if they had, written again from results.json
    results = json.loads((result.report_dir / "results.json").read_text())
    for change in results["recipes"]["bf16-pure"]["per_label"].values():
        change["change_pp"] = -5.0
    rows = write_markdown(results, tmp_path / "report.md").read_text().splitlines()
    label_rows = [line for line in rows if line.startswith("| bf16-pure | ")][-3:]
    assert any("ORG\\|GOV" in line for line in label_rows)
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 6 for line in label_rows)  # 5 columns
