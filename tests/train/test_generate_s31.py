"""Session 31's hunt in `lowbit generate`: its samples against transformers' `model.generate`, and
standard streams a user's shell may hand it (a non-UTF-8 encoding, closed)."""

import io
import sys

import pytest
import torch

from lowbit.cli import main
from lowbit.train import load_run, sample_text
from lowbit.train.tasks import evaluating


@pytest.fixture
def run(nano_run):
    """The session's one-step nano run (tests/train/conftest.py)."""
    return nano_run


def one_line_error(capsys, *parts: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1 and "; fix: " in err
    for part in parts:
        assert part in err


def transformers_text(model, tokenizer, precision, prompt, seed, **settings) -> str:
    """What transformers' ``model.generate`` continues ``prompt`` with under the run's recipe,
    cut at the end-of-text token as `lowbit generate` cuts it."""
    ids = tokenizer.encode(prompt)
    torch.manual_seed(seed)
    with evaluating(model, precision):
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=24, eos_token_id=tokenizer.eot_id,
            pad_token_id=tokenizer.eot_id, **settings,
        )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    new = new[: new.index(tokenizer.eot_id)] if tokenizer.eot_id in new else new
    return prompt + tokenizer.decode(new)


def test_greedy_and_seeded_samples_equal_transformers_generate(run):
    """Greedy (temperature 0) equals transformers' greedy token for token, and a seed samples what
    transformers samples after ``torch.manual_seed`` of that seed, with the same temperature,
    top-k and top-p: one arithmetic, one RNG use. Top-k 1 and a tiny top-p included: like
    transformers', they keep every token tied for the largest logit (bf16 logits tie often), so
    they are greedy only where no two tie."""
    loaded = load_run(str(run), None, "cpu")
    model, tokenizer, precision = loaded.model, loaded.task.tokenizer, loaded.precision

    def ours(prompt, temperature, top_k, seed=0, top_p=1.0):
        return sample_text(model, tokenizer, precision, prompt, 24, temperature, top_k, seed, top_p)

    for prompt in ["def ", " \n\n", "naïve 日本"]:
        greedy = transformers_text(model, tokenizer, precision, prompt, 0, do_sample=False)
        assert ours(prompt, 0.0, None) == greedy
    for temperature, top_k, top_p in [(0.8, 40, 1.0), (1.0, 0, 1.0), (0.7, 0, 0.9), (0.8, 1, 1.0)]:
        for seed in (0, 1):
            theirs = transformers_text(
                model, tokenizer, precision, "def ", seed,
                do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
            )  # fmt: skip
            assert ours("def ", temperature, top_k, seed, top_p) == theirs
    tiny_p = dict(do_sample=True, temperature=0.8, top_k=0, top_p=1e-9)
    assert ours(" ", 0.8, 0, 3, 1e-9) == transformers_text(
        model, tokenizer, precision, " ", 3, **tiny_p
    )


def test_characters_standard_outputs_encoding_lacks_are_escaped_with_a_warning(
    run, capsys, monkeypatch
):
    """An ASCII or Latin-1 standard output (a C locale's PYTHONIOENCODING, Windows' cp1252 for a
    redirected file) cannot hold "é" or the U+FFFD a byte-level model writes for bytes that are
    not UTF-8: the sample ended on a UnicodeEncodeError traceback after the sampling, nothing
    printed."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["generate", str(run), "--prompt", "café", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(argv) == 0
    stdout.flush()
    assert stdout.buffer.getvalue().decode("ascii").startswith("caf\\xe9")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: warning: ")
    assert "(ascii) cannot write U+00E9" in err and "fix: set PYTHONUTF8=1" in err


def test_a_closed_standard_input_for_prompt_file_dash_is_refused_in_one_line(
    run, capsys, monkeypatch
):
    """Started with standard input closed (`<&-`, some daemons), Python's ``sys.stdin`` is None:
    `--prompt-file -` ended on an AttributeError traceback."""
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["generate", str(run), "--prompt-file", "-", "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "standard input is closed", "--prompt")


def test_a_closed_standard_output_is_refused_before_the_model_loads(run, capsys, monkeypatch):
    """Started with standard output closed (`>&-`), ``sys.stdout`` is None: the command sampled,
    then ended on an AttributeError traceback."""
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "standard output is closed", "> sample.txt")


def test_train_summary_characters_the_output_encoding_lacks_are_escaped(
    tmp_path, capsys, monkeypatch
):
    """`lowbit train`'s summary ends with a sample of the model, which may hold any character:
    an ASCII standard output ended the finished run on a UnicodeEncodeError traceback, exit 1."""
    from lowbit.train.trainer import RunResult

    summary = RunResult.summary
    monkeypatch.setattr(RunResult, "summary", lambda self: summary(self) + "\nsample: caf\u00e9")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["train", "--task", "image-classification", "--steps", "1", "--batch-size", "8"]
    assert main([*argv, "--quiet", "--out", str(tmp_path / "run")]) == 0
    stdout.flush()
    assert "sample: caf\\xe9" in stdout.buffer.getvalue().decode("ascii")
    assert "(ascii) cannot write U+00E9" in capsys.readouterr().err
