"""Session 28: `lowbit generate --top-p P` (nucleus sampling, transformers' arithmetic) and
`--prompt-file PATH` (the prompt from a UTF-8 file, or standard input)."""

import io
import sys

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from lowbit.cli import main
from lowbit.train.generate import top_p_filter


@pytest.fixture
def run(nano_run):
    """The session's one-step nano run (tests/train/conftest.py)."""
    return nano_run


def generate(run, capsys, *flags: str) -> str:
    assert main(["generate", str(run), "--max-new-tokens", "40", *flags]) == 0
    return capsys.readouterr().out


def one_line_error(capsys, *parts: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("lowbit: error: ") and captured.err.count("\n") == 1
    assert "; fix: " in captured.err
    for part in parts:
        assert part in captured.err
    return captured.err


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_filter_matches_transformers_top_p_warper_bit_for_bit(top_p):
    """The kept tokens and their sampling distribution equal transformers' for the same logits:
    random ones at several scales, ones with ties, and ones top-k already cut to -inf."""
    warper = TopPLogitsWarper(top_p)
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        vocab = (2, 7, 257, 1000)[trial % 4]
        logits = torch.randn(vocab, generator=generator) * (0.1, 1.0, 5.0)[trial % 3]
        if trial % 5 == 1:  # ties: a few logit values repeated
            logits = logits.round()
        if trial % 5 == 2 and vocab > 2:  # top-k cut first, as `sample_text` does
            cutoff = torch.topk(logits, vocab // 2).values[-1]
            logits = logits.masked_fill(logits < cutoff, float("-inf"))
        ours = top_p_filter(logits, top_p)
        theirs = warper(None, logits[None])[0]
        assert torch.equal(ours, theirs)
        assert torch.equal(torch.softmax(ours, -1), torch.softmax(theirs, -1))
        assert torch.isfinite(ours).any()  # at least the likeliest token stays


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    kept = lambda p: torch.isfinite(top_p_filter(probs.log(), p)).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


def test_generate_top_p_samples_from_the_nucleus_reproducibly(run, capsys):
    """A tiny nucleus holds the likeliest token only: sampling at temperature 1 is greedy. A
    seed gives the same text every time; another seed, and another P, give other text."""
    greedy = generate(run, capsys, "--temperature", "0")
    assert generate(run, capsys, "--temperature", "1", "--top-k", "0", "--top-p", "1e-9") == greedy
    nucleus = ["--temperature", "1", "--top-k", "0", "--top-p", "0.5", "--seed", "7"]
    first = generate(run, capsys, *nucleus)
    assert generate(run, capsys, *nucleus) == first
    assert generate(run, capsys, *nucleus[:-1], "8") != first
    assert generate(run, capsys, *nucleus[:-3], "1", "--seed", "7") != first
    # --top-p 1 is the default: no filter at all
    assert generate(run, capsys, "--seed", "3", "--top-p", "1") == generate(
        run, capsys, "--seed", "3"
    )


@pytest.mark.parametrize("top_p", ["0", "-0.1", "1.5", "nan", "inf"])
def test_generate_refuses_a_top_p_outside_0_1_in_one_line(run, capsys, top_p):
    assert main(["generate", str(run), "--top-p", top_p]) == 2
    one_line_error(capsys, f"--top-p {float(top_p)} is not in (0, 1]", "fix: use e.g. 0.9")


def test_generate_reads_the_prompt_from_a_utf8_file(run, tmp_path, capsys):
    """The file's text exactly (several lines, a final newline, non-ASCII); a byte-order mark
    is dropped; the sample equals the one from the same text given as --prompt."""
    text = "import os\ndef grüße():\n"
    path = tmp_path / "prompt.txt"
    path.write_text(text, encoding="utf-8")
    from_file = generate(run, capsys, "--prompt-file", str(path), "--seed", "5")
    assert from_file.startswith(text)
    assert from_file == generate(run, capsys, "--prompt", text, "--seed", "5")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert generate(run, capsys, "--prompt-file", str(path), "--seed", "5") == from_file


def test_generate_reads_the_prompt_from_stdin_for_a_dash(run, capsys, monkeypatch):
    text = "def f(x):\n    return"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    from_stdin = generate(run, capsys, "--prompt-file", "-", "--temperature", "0")
    assert from_stdin == generate(run, capsys, "--prompt", text, "--temperature", "0")


def test_generate_refuses_both_prompt_and_prompt_file(run, tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("x")
    assert main(["generate", str(run), "--prompt", "y", "--prompt-file", str(path)]) == 2
    one_line_error(capsys, "--prompt and --prompt-file both give the prompt", "give one of them")


def test_generate_refuses_a_prompt_file_it_cannot_read_naming_it(run, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert main(["generate", str(run), "--prompt-file", str(missing)]) == 2
    one_line_error(capsys, f"--prompt-file {missing}: no such file", "check the path")
    assert main(["generate", str(run), "--prompt-file", str(tmp_path)]) == 2
    one_line_error(capsys, f"--prompt-file {tmp_path}: a folder, not a file")
    below_a_file = tmp_path / "p.txt" / "x"
    below_a_file.parent.write_text("x")
    assert main(["generate", str(run), "--prompt-file", str(below_a_file)]) == 2
    one_line_error(capsys, f"--prompt-file {below_a_file}: cannot be read (Not a directory)")
    assert main(["generate", str(run), "--prompt-file", ""]) == 2
    one_line_error(capsys, "--prompt-file is an empty string")


def test_generate_refuses_a_prompt_file_that_is_not_utf8(run, tmp_path, capsys, monkeypatch):
    """Latin-1 bytes were not to reach the tokenizer as U+FFFD replacement characters."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("def café".encode("latin-1"))
    assert main(["generate", str(run), "--prompt-file", str(path)]) == 2
    one_line_error(capsys, f"--prompt-file {path}: not UTF-8 text (byte 0xe9 at offset 7")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff")))
    assert main(["generate", str(run), "--prompt-file", "-"]) == 2
    one_line_error(capsys, "--prompt-file standard input: not UTF-8 text", "iconv")


def test_generate_help_documents_top_p_and_prompt_file(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--top-p P nucleus sampling" in text and "P in (0, 1]" in text
    assert "--prompt-file PATH" in text and "'-' reads standard input" in text
