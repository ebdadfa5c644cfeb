"""Session 28's hunt: `lowbit train --task causal-lm --data PATH` as a user with their own text and
their own model folder runs it."""

import json

import pytest

from lowbit.cli import main

TINY = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--steps", "1", "--quiet"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "alpha", "beta"]


def write_text(path, paragraphs=150):
    text = "\n\n".join(
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)) for i in range(paragraphs)
    )
    path.write_text(text)
    return path


def gpt2_folder(folder, text):
    """A GPT-2 checkpoint folder as older ones come: config.json, vocab.json and merges.txt, no
    tokenizer.json or tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text], trainer)
    folder.mkdir()
    bpe.model.save(str(folder))  # vocab.json, merges.txt
    config = GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_embd=32, n_layer=1, n_head=2, n_positions=64
    )
    config.save_pretrained(folder)
    return folder


def test_a_gpt2_folder_with_vocab_and_merges_trains_on_its_own_tokenizer(tmp_path, capsys):
    """A model folder bringing its tokenizer as vocab.json + merges.txt (GPT-2's classic files)
    was taken for one without a tokenizer: the run trained it on byte ids, without a word."""
    data = write_text(tmp_path / "book.txt")
    model = gpt2_folder(tmp_path / "gpt2", data.read_text())
    out = tmp_path / "run"
    assert (
        main(["train", "--model", str(model), "--data", str(data), *TINY, "--out", str(out)]) == 0
    )
    saved = sorted(p.name for p in (out / "tokenizer").iterdir())
    assert "lowbit_tokenizer.json" not in saved  # not lowbit's byte tokenizer
    assert "vocab.json" in saved or "tokenizer.json" in saved


@pytest.mark.parametrize(
    "files, problem",
    [
        ({"tokenizer_config.json": "{not json"}, "the tokenizer is damaged"),
        ({"tokenizer.json": "{}"}, "the tokenizer is damaged"),
        (
            {"tokenizer_config.json": json.dumps({"eos_token": "</s>"})},
            "the tokenizer holds only its special tokens",
        ),
    ],
)
def test_a_model_folder_whose_tokenizer_cannot_be_read_is_one_line(
    tmp_path, capsys, files, problem
):
    """A damaged tokenizer file in a --model folder stopped the run with a JSONDecodeError or a
    KeyError traceback; a tokenizer_config.json without vocabulary files gave a tokenizer of the
    special tokens alone, and every word of the text became the unknown token."""
    from transformers import GPT2Config

    data = write_text(tmp_path / "book.txt")
    model = tmp_path / "model"
    GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64).save_pretrained(
        model
    )
    for name, content in files.items():
        (model / name).write_text(content)
    out = tmp_path / "run"
    assert (
        main(["train", "--model", str(model), "--data", str(data), *TINY, "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert f"lowbit: error: {model}: {problem}" in err
    assert "fix: save the model's tokenizer into its folder" in err
    assert "Traceback" not in err and not out.exists()


def test_a_folder_reads_its_linked_folders_as_its_glob_does(tmp_path):
    """`--data DIR` left out the files of a linked folder (a sub-corpus linked in from another
    disk) without a word, where `--data 'DIR/**/*.txt'` read them: the two named other data."""
    from lowbit.data import load_texts

    elsewhere = tmp_path / "disk" / "wiki"
    elsewhere.mkdir(parents=True)
    (elsewhere / "page.txt").write_text("linked text\n")
    data = tmp_path / "[data]"  # a folder name a glob reads as a pattern
    data.mkdir()
    (data / "own.txt").write_text("own text\n")
    (data / "wiki").symlink_to(elsewhere)
    (data / "wiki" / "loop").symlink_to("..")  # a link back up is not entered again
    expected = ["own.txt", "wiki/page.txt"]
    assert [d.name for d in load_texts(data)] == expected
    (tmp_path / "plain").symlink_to(data)
    assert [d.name for d in load_texts(str(tmp_path / "plain" / "**" / "*.txt"))] == expected


def test_data_that_comes_split_keeps_its_split(tmp_path):
    """A folder of train/, valid/ and test/ (or a glob over train.jsonl and test.jsonl) was split
    file by file by the hash of each name: ~90% of the user's test files were trained on, and a
    few of their training files validated on."""
    from lowbit.data import load_corpus

    folder = tmp_path / "wiki"
    for split in ("train", "valid", "test"):
        (folder / split).mkdir(parents=True)
        for i in range(20):
            (folder / split / f"{i}.txt").write_text(f"{split} text {i}\n")
    corpus = load_corpus(str(folder))
    tops = {name: {d.name.split("/")[0] for d in docs} for name, docs in corpus.splits.items()}
    assert tops == {"train": {"train"}, "validation": {"valid"}, "test": {"test"}}

    records = tmp_path / "exported"  # a Hugging Face dataset's to_json, per split
    records.mkdir()
    for split in ("train", "test"):
        lines = [json.dumps({"text": f"{split} record {i}"}) for i in range(200)]
        (records / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    corpus = load_corpus(str(records / "*.jsonl"))
    files = {name: {d.name.split(":")[0] for d in docs} for name, docs in corpus.splits.items()}
    # no validation file: the rule's validation share of the train file validates
    assert files == {
        "train": {"train.jsonl"},
        "validation": {"train.jsonl"},
        "test": {"test.jsonl"},
    }
    assert len(corpus.splits["test"]) == 200


def test_one_file_named_for_a_split_is_still_split_by_the_rule(tmp_path):
    """Only data whose top-level entries name a train split and another comes split: one file
    called train.jsonl, or a folder holding only train/, is split by the rule as before."""
    from lowbit.data import load_corpus

    one = tmp_path / "train.jsonl"
    one.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(200)))
    assert all(load_corpus(str(one)).splits.values())
    (tmp_path / "only" / "train").mkdir(parents=True)
    for i in range(200):
        (tmp_path / "only" / "train" / f"{i}.txt").write_text(f"text {i}")
    assert all(load_corpus(str(tmp_path / "only")).splits.values())


def test_a_compressed_data_file_is_named_as_compressed(tmp_path, capsys):
    """A .jsonl.gz (C4's, The Pile's .jsonl.zst) was refused as "not UTF-8 text (byte 1); fix:
    convert it to UTF-8": its encoding was never the problem."""
    import gzip

    data = tmp_path / "c4.jsonl.gz"
    data.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 50))
    out = tmp_path / "run"
    assert main(["train", "--model", "nano", "--data", str(data), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"lowbit: error: {data}: gzip-compressed, not text; fix: decompress it" in err
