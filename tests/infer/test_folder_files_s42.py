"""Session 42: an inference folder's own copy of its run's tokenizer (or tags, word vocabulary)
is fingerprinted in quantization.json (``run_files``) and checked at every load, as the run's own
copy is (run.json's ``run_files``): a tokenizer swapped into the folder was blamed on its
model.safetensors ("its tensors do not fit") when of another size, and read on other token ids
without a word when of the same size."""

from __future__ import annotations

import json
import random

from lowbit.cli import main
from lowbit.data import build_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _text(path, words, seed: int) -> None:
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(words) for _ in range(20)) for _ in range(120))
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")


def test_a_folder_whose_tokenizer_was_swapped_is_refused_and_one_from_before_loads(
    tmp_path, capsys
):
    data, run, out = tmp_path / "a.txt", tmp_path / "run", tmp_path / "q"
    _text(data, WORDS, 0)
    argv = ["train", "--data", str(data), "--tokenizer", "bpe", "--vocab-size", "280"]
    argv += ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
    assert main([*argv, "--recipe", "fp32", "--steps", "1", "--quiet", "--out", str(run)]) == 0
    assert main(["quantize", str(run), "--to", "int8", "--out", str(out)]) == 0
    original = (out / "tokenizer" / "tokenizer.json").read_bytes()
    other = tmp_path / "other.txt"  # the same number of ids, learned from other words
    _text(other, [word[::-1] for word in WORDS], 1)
    foreign = build_tokenizer("bpe", [other.read_text()], 280)
    assert foreign.vocab_size == 280
    foreign.save(out / "tokenizer")  # the folder's copy only: the run's own is as it trained
    capsys.readouterr()
    expected = (
        f"lowbit: error: {out}: its tokenizer, tags or vocabulary changed since it was written "
        "(tokenizer/tokenizer.json changed), so its model would read other token or tag ids; "
        f"fix: write it again from {run.resolve()} (lowbit quantize/prune)"
    )
    for command in (
        ["eval", str(out), "--max-batches", "1", "--quiet"],
        ["generate", str(out), "--prompt", "alpha", "--max-new-tokens", "2"],
    ):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines() == [expected], command
        assert captured.out == ""

    # put back as it was, the folder loads; a folder written before session 42 records no
    # run_files and loads as before, whatever its tokenizer holds
    (out / "tokenizer" / "tokenizer.json").write_bytes(original)
    assert main(["eval", str(out), "--max-batches", "1", "--quiet"]) == 0
    foreign.save(out / "tokenizer")
    manifest = json.loads((out / "quantization.json").read_text())
    del manifest["run_files"]
    (out / "quantization.json").write_text(json.dumps(manifest))
    assert main(["generate", str(out), "--prompt", "alpha", "--max-new-tokens", "2"]) == 0
