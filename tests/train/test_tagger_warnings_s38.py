"""Session 38: a tagger's warnings a user is owed. `lowbit eval RUN --split train` scores the train
split, and its sentences cut by --seq-len are left out of those metrics: it said nothing (the
warning skipped every run's train split, told once as training started), while `lowbit train`
says each cut split once."""

import pytest

from lowbit.cli import main

LONG = [f"w{i} O" for i in range(20)] + [""]  # 20 words: past --seq-len 12
SHORT = ["Ann B-PER", "Lee I-PER", "ran O", ""]


def _cut_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "sentences are longer than" in line]


def _data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(SHORT * 6 + LONG * 2))
    for name in ("dev.txt", "test.txt"):
        (data / name).write_text("\n".join(SHORT * 6))
    return data


def test_eval_of_the_train_split_says_its_cut_sentences(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "1", "--data", str(_data(tmp_path)), "--quiet"]
    assert main([*argv, "--out", str(run)]) == 0
    assert _cut_warnings(capsys.readouterr().err) == [  # once, though training evaluates
        "lowbit: warning: 2 of 8 train sentences are longer than --seq-len 12 holds; their words "
        "past it are left out of training; fix: raise --seq-len (up to the encoder's 512)"
    ]
    assert main(["eval", str(run), "--split", "train", "--quiet"]) == 0
    assert _cut_warnings(capsys.readouterr().err) == [
        "lowbit: warning: 2 of 8 train sentences are longer than the run's --seq-len 12 holds; "
        "their words past it are left out of the metrics; fix: train a run with a longer "
        "--seq-len (up to the encoder's 512), or split such sentences into shorter ones (a blank "
        "line between the parts)"
    ]
    assert main(["eval", str(run), "--split", "test", "--quiet"]) == 0  # no sentence cut there
    assert _cut_warnings(capsys.readouterr().err) == []


def _folder(folder, config) -> str:
    """A pretrained-model folder of ``config`` with a word-piece tokenizer of a few words."""
    from transformers import AutoModelForTokenClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ann", "lee", "ran", "rome"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    AutoModelForTokenClassification.from_config(config).save_pretrained(folder)
    return str(folder)


def _train(tmp_path, model: str) -> list[str]:
    """A one-step run of ``model``; its command line."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    for name in ("train.txt", "dev.txt", "test.txt"):
        (data / name).write_text("\n".join(SHORT * 4))
    argv = ["train", "--task", "token-classification", "--model", model, "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "1", "--data", str(data), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    return argv


def _decoder_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "causal attention" in line]


def test_a_decoder_tagger_is_told_it_sees_only_the_words_before(tmp_path, capsys):
    from transformers import LlamaConfig

    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    llama = _folder(tmp_path / "llama", LlamaConfig(vocab_size=9, intermediate_size=32, **sizes))
    argv = _train(tmp_path, llama)
    assert _decoder_warnings(capsys.readouterr().err) == [
        f"lowbit: warning: {llama}: a decoder ('llama', causal attention): each word is tagged "
        "from the words before it alone, never those after, which costs accuracy where the "
        "words after decide a tag (named entities); fix: fine-tune an encoder that reads both "
        "sides, --model minilm or a BERT-style folder"
    ]
    assert main([*argv, "--steps", "2", "--resume", "--out", str(tmp_path / "run")]) == 0
    assert _decoder_warnings(capsys.readouterr().err) == []  # told as the run started


def test_an_encoder_tagger_is_not_told_but_a_bert_built_as_a_decoder_is(tmp_path, capsys):
    """Told by what the model sees, not its type: a BERT config with is_decoder attends causally."""
    from transformers import BertConfig

    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    bert = _folder(tmp_path / "bert", BertConfig(vocab_size=9, intermediate_size=32, **sizes))
    _train(tmp_path / "a", bert)
    assert _decoder_warnings(capsys.readouterr().err) == []
    config = BertConfig(vocab_size=9, intermediate_size=32, is_decoder=True, **sizes)
    causal = _folder(tmp_path / "causal", config)
    _train(tmp_path / "b", causal)
    (warning,) = _decoder_warnings(capsys.readouterr().err)
    assert warning.startswith(f"lowbit: warning: {causal}: a decoder ('bert', causal attention)")


def test_eval_tells_of_the_split_it_evaluates_alone(tmp_path, capsys, monkeypatch):
    """`lowbit eval --split test` warned that a tag of the validation split never occurs in
    training: nothing to do with the numbers it printed."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(SHORT * 6))
    (data / "dev.txt").write_text("\n".join(["Rome B-LOC", "ran O", ""] + SHORT * 3))
    (data / "test.txt").write_text("\n".join(SHORT * 3))
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "1", "--data", str(data), "--quiet"]
    assert main([*argv, "--out", str(run)]) == 0
    told = "1 tag of the validation split never occurs in training (B-LOC)"
    assert told in capsys.readouterr().err
    for split, said in (("test", False), ("validation", True)):
        monkeypatch.setattr("lowbit.errors._said", set())  # a new process, as each command
        assert main(["eval", str(run), "--split", split, "--quiet"]) == 0
        assert (told in capsys.readouterr().err) is said


def _funnel():
    from transformers import FunnelConfig

    sizes = {"d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 32}
    return FunnelConfig(vocab_size=9, block_sizes=[1, 1, 1], **sizes)


def _ibert():
    from transformers import IBertConfig

    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    return IBertConfig(vocab_size=9, intermediate_size=32, **sizes)


@pytest.mark.parametrize("config", [_funnel, _ibert], ids=["funnel", "ibert"])
def test_the_decoder_probe_does_not_stop_an_encoder_that_trains(tmp_path, capsys, config):
    """The probe of every new pretrained tagger ran 2 tokens through it: Funnel, which pools its
    positions, raised RuntimeError there ('index 8 is out of bounds') and I-BERT's QuantEmbedding
    has no num_embeddings (AttributeError), each ending a run that trains."""
    folder = _folder(tmp_path / "model", config())
    _train(tmp_path, folder)
    assert _decoder_warnings(capsys.readouterr().err) == []
