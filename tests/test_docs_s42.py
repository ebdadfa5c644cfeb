"""The docs against the code (session 42): lines README.md quotes from `lowbit train` are the
lines it prints, so that a reworded message or a changed default model shows here, not to a
reader comparing the tour with their terminal."""

import re
from pathlib import Path

import lowbit
from lowbit.cli import main
from lowbit.models.causal_lm import build_causal_lm

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _quote_after(marker: str) -> str:
    """The backquoted text README.md gives after ``marker`` (a quote may wrap over lines)."""
    match = re.search(re.escape(marker) + r"\s*`([^`]+)`", README)
    assert match, f"README.md no longer quotes a line after {marker!r}"
    return " ".join(match[1].split())


def test_the_readme_start_up_line_of_fp8_tensorwise_is_the_default_models():
    quoted = _quote_after("as `lowbit train --recipe fp8-tensorwise` on the default model prints")
    model = build_causal_lm("tiny", vocab_size=256)  # the default run: byte tokens
    report = lowbit.convert(model, "fp8-tensorwise")
    assert quoted == f"lowbit: recipe fp8-tensorwise {report.kept_line('bf16')}"


def test_the_readme_optimizer_state_refusal_is_what_a_resume_prints(tmp_path, capsys, monkeypatch):
    quoted = _quote_after("of an fp32-state run says")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "nano", "--steps", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main([*argv, "--eval-batches", "1", "--quiet", "--out", "run"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "run", "--optimizer-state", "8bit"]) == 2
    err = capsys.readouterr().err
    assert quoted in err and err.startswith("lowbit: error: cannot resume"), err
