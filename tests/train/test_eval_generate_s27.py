"""Session 27: `lowbit eval` and `lowbit generate` on runs a user may hold (a diverged checkpoint)."""

import json
import math
import sys

import pytest
import torch

from lowbit.cli import main
from tests.once import folder_once_per_session

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A causal-LM run whose checkpoint holds NaN weights (its output layer), as one that
    diverged in its last steps without the gradient check catching it. Made once per session
    (read only)."""

    def make(folder):
        run = folder / "run"
        argv = [
            "train",
            *NANO,
            "--steps",
            "2",
            "--eval-interval",
            "2",
            "--quiet",
            "--out",
            str(run),
        ]
        assert main(argv) == 0
        path = run / "checkpoints" / "step-0000002.pt"
        state = torch.load(path, weights_only=False)
        state["model"]["lm_head.weight"].fill_(float("nan"))
        torch.save(state, path)
        return run

    return folder_once_per_session(tmp_path_factory, "eval-generate-s27", make)


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generate_from_a_nan_checkpoint_is_refused_in_one_line(nan_run, capsys, temperature):
    """Sampling raised multinomial's RuntimeError (a traceback); greedy printed argmax's id of
    a NaN row as if the model had chosen it."""
    argv = ["generate", str(nan_run), "--max-new-tokens", "3", "--temperature", temperature]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "lowbit: error: the model's output is NaN at new token 1" in captured.err
    assert "fix: generate from an earlier checkpoint" in captured.err


def test_eval_json_of_a_nan_checkpoint_is_valid_json(nan_run, capsys):
    """`--json` printed a bare NaN, which strict JSON parsers refuse; metrics.jsonl's spelling."""
    assert main(["eval", str(nan_run), "--max-batches", "1", "--json"]) == 0
    line = capsys.readouterr().out.strip()
    metrics = json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert metrics["loss"] == metrics["ppl"] == "nan" and metrics["tokens"] == 64
    assert math.isnan(float(metrics["loss"]))


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_checkpoint_file_given_as_run_dir_names_its_run_folder(nan_run, capsys, command):
    """A checkpoint file as RUN_DIR (tab completion into checkpoints/) was reported as "no such
    run folder", though it exists."""
    path = nan_run / "checkpoints" / "step-0000002.pt"
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: a checkpoint file, not a run folder" in err
    assert f"fix: give its run folder, and the file as --checkpoint ({nan_run} --checkpoint " in err
    assert main([command, str(nan_run / "config.yaml")]) == 2
    assert "config.yaml: a file, not a run folder; fix: give the --out folder of a run" in (
        capsys.readouterr().err
    )


def test_generate_refuses_an_image_classification_run_in_good_english(tmp_path, capsys):
    run = tmp_path / "cnn"
    argv = ["train", "--task", "image-classification", "--batch-size", "4", "--steps", "1"]
    assert main([*argv, "--eval-batches", "1", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {run} is an image-classification run; fix: generate from a causal-lm run\n"
    )


def test_generate_escapes_control_characters_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    """An early byte-level model samples control bytes (ESC among them): printed raw to a
    terminal they drive it (the training summary's sample escapes them); a pipe gets them raw."""
    run = tmp_path / "lm"
    argv = ["train", *NANO, "--steps", "1", "--eval-interval", "1", "--quiet", "--out", str(run)]
    assert main(argv) == 0
    capsys.readouterr()
    sample = ["generate", str(run), "--max-new-tokens", "200", "--top-k", "0", "--seed", "3"]
    assert main(sample) == 0
    raw = capsys.readouterr().out
    controls = {c for c in raw if ord(c) < 32 and c not in "\t\n"}
    assert controls  # the seed samples some: the check below means something
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(sample) == 0
    shown = capsys.readouterr().out
    assert not {c for c in shown if ord(c) < 32 and c not in "\t\n"}
    assert all(c.encode("unicode_escape").decode() in shown for c in controls)


def test_a_temperature_below_float32s_range_samples_greedily_with_a_zero_logit():
    """1e-300 is 0 in float32: a logit of exactly 0 divided by it is NaN, and multinomial
    raised "probability tensor contains either inf, nan" instead of the greedy limit."""
    from lowbit import Precision
    from lowbit.data import build_tokenizer
    from lowbit.train.generate import sample_text
    from tests.train.test_generate import tiny_llama

    tokenizer = build_tokenizer("byte")
    model = tiny_llama(vocab_size=300, positions=64)
    with torch.no_grad():
        model.lm_head.weight[:10] = 0  # ids 0-9 score exactly 0 at every position
    greedy = sample_text(model, tokenizer, Precision("fp32"), "ab", 5, 0.0, top_k=None)
    for temperature in (1e-300, 1e-46):
        assert sample_text(model, tokenizer, Precision("fp32"), "ab", 5, temperature) == greedy
