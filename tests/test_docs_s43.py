"""The docs against the code (session 43): the console transcripts of README.md's tour have the
lines `lowbit train` and `lowbit eval` print, line for line once numbers, paths, the model and the
recipe are set aside: each run's summary with its header (status word kept), a Ctrl-C's message and
the `resume with:` line. tests/test_docs_s42.py checks two quoted lines; a summary line renamed,
dropped or moved (`train loss`, `throughput`, the eval header) left the tour showing output no
command prints."""

import os
import re
import signal
from pathlib import Path

from lowbit.cli import main
from lowbit.train import trainer as trainer_module

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
NUMBER = r"\d[\d,]*(?:\.\d+)?"
PATH_LABELS = ("run folder", "checkpoint")  # a line whose value is the run's own path
WARNING = "lowbit: warning:"  # a machine's (no native fp8 kernels on a CPU): not compared


def _transcripts(command: str) -> list[list[str]]:
    """The output lines README shows under each `$ lowbit COMMAND ...` of its indented console
    blocks (up to the next `$` line or the block's end), without the lines it elides (`...`)."""
    blocks, lines = [], None
    for line in README.splitlines():
        prompt = re.match(r"    \$ (.*)", line)
        if prompt:
            lines = [] if re.match(rf"lowbit {command}\b", prompt[1]) else None
            if lines is not None:
                blocks.append(lines)
        elif lines is not None and line.startswith("    ") and line.strip() != "...":
            lines.append(line[4:])
        elif not line.startswith("    "):
            lines = None
    return blocks


def _shape(line: str) -> str:
    """A printed line with its figures as N, a run's path as PATH (a summary's, the resume
    command's), a summary header's model and recipe as M and R; without the ``^C`` that a terminal
    echoes before a Ctrl-C's message."""
    line = line.removeprefix("^C ").rstrip()
    label = line.strip().split("  ")[0]
    if label in PATH_LABELS:
        return f"{line[: line.index(label) + len(label)]} PATH"
    line = re.sub(r"^(resume with: .* --resume) \S+$", r"\1 PATH", line)
    line = re.sub(r"^(lowbit train: [\w-]+) [^,]+, recipe [^,]+,", r"\1 M, recipe R,", line)
    return re.sub(NUMBER, "N", line)


def _unprinted(shown: list[str], printed: list[str]) -> list[str]:
    """The shown lines not printed, in shape, in the order shown (each after the previous)."""
    shapes = [_shape(line) for line in printed]
    missing, at = [], 0
    for line in shown:
        try:
            at = shapes.index(_shape(line), at) + 1
        except ValueError:
            missing.append(line)
    return missing


TRAIN = ["train", "--model", "nano", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]


def _train_and_eval(tmp_path, capsys) -> tuple[list[str], list[str]]:
    """What `lowbit train` and `lowbit eval --split test` print for a 2-step run of the default
    task and recipe (the nano model and short batches, so the test takes seconds)."""
    run = str(tmp_path / "run")
    assert main([*TRAIN, "--steps", "2", "--eval-interval", "1", "--out", run]) == 0
    trained = capsys.readouterr().out.splitlines()
    assert main(["eval", run, "--split", "test", "--max-batches", "1", "--quiet"]) == 0
    return trained, capsys.readouterr().out.splitlines()


def _interrupted(tmp_path, capsys, monkeypatch) -> list[str]:
    """What a run stopped by a Ctrl-C during its second step prints: the message on stderr, then
    its summary and resume command (a terminal shows them in that order)."""
    step = trainer_module.Trainer.step

    def pressed(self, *args, **kwargs):
        if self.step_idx == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "step", pressed)
    argv = [*TRAIN, "--steps", "3", "--out", str(tmp_path / "stopped")]
    assert main(argv) == 130
    printed = capsys.readouterr()
    return [*printed.err.splitlines(), *printed.out.splitlines()]


def test_the_readme_transcripts_of_train_and_eval_are_what_the_commands_print(
    tmp_path, capsys, monkeypatch
):
    trained, evaluated = _train_and_eval(tmp_path, capsys)
    stopped = _interrupted(tmp_path, capsys, monkeypatch)
    # the default run, the fp8 run's Ctrl-C and its resume (the MiniLM tagger's `$ HF_HUB_OFFLINE=1
    # ...` is not read: a tagger prints other metrics)
    summaries = [b for b in _transcripts("train") if any("lowbit train:" in x for x in b)]
    assert len(summaries) >= 3, "README.md no longer shows a causal-lm run's summary"
    assert any("(interrupted)" in line for b in summaries for line in b), "no stopped run shown"
    for block in summaries:
        shown = [line for line in block if not line.startswith(WARNING)]
        printed = stopped if any("(interrupted)" in line for line in block) else trained
        assert not _unprinted(shown, printed), "\n".join(block)
    evals = [block for block in _transcripts("eval") if block]
    assert evals, "README.md no longer shows what `lowbit eval` prints"
    for block in evals:
        header = re.sub(r"causal-lm \w+", "causal-lm tiny", evaluated[0])
        assert not _unprinted(block, [header, *evaluated[1:]]), "\n".join(block)


def test_the_transcript_check_catches_a_renamed_or_moved_line():
    printed = [
        "lowbit train: causal-lm tiny, recipe bf16-mixed, 2 steps (completed)",
        "  validation loss  5.5154 -> 5.4421   ppl 248.5 -> 230.9",
        "  train loss       5.4946 (mean of the last steps)",
        "  run folder       /tmp/x/run",
    ]
    shown = [
        "  validation loss  5.5625 -> 1.8889   ppl 260.5 -> 6.612",
        "  train loss       1.7877 (mean of the last steps)",
        "  run folder       runs/causal-lm-bf16-mixed-20261130-000320",
    ]
    assert _unprinted(shown, printed) == []
    assert _unprinted(["  training loss    1.7877 (mean of the last steps)"], printed) == [
        "  training loss    1.7877 (mean of the last steps)"
    ]
    assert _unprinted(shown[::-1], printed) == shown[1::-1]  # moved: out of order


def test_headers_and_resume_commands_keep_their_words():
    """A summary header's model, recipe and step count, and the resume command's run folder, are
    set aside; its status word and the command's words are not."""
    printed = [
        "lowbit train: causal-lm nano, recipe bf16-mixed, 2 steps (interrupted)",
        "resume with: lowbit train --resume /tmp/x/stopped",
    ]
    shown = [
        "lowbit train: causal-lm tiny, recipe fp8-tensorwise, 26 steps (interrupted)",
        "resume with: lowbit train --resume runs/fp8",
    ]
    assert _unprinted(shown, printed) == []
    for edited in (
        "lowbit train: causal-lm tiny, recipe fp8-tensorwise, 26 steps (stopped)",
        "lowbit train: causal-lm tiny, preset fp8-tensorwise, 26 steps (interrupted)",
        "resume with: lowbit train --continue runs/fp8",
        "resume: lowbit train --resume runs/fp8",
    ):
        assert _unprinted([edited], printed) == [edited]
