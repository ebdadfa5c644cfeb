"""The train / eval / generate commands end to end, and their one-line errors for bad input."""

import json
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.train import trainer as trainer_module

FAST_LM = [
    "--steps",
    "4",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--eval-interval",
    "2",
    "--eval-batches",
    "1",
    "--quiet",
]


@pytest.fixture(autouse=True)
def one_thread_short_samples(monkeypatch):
    """Tiny models run faster on one thread (and far faster on a busy machine); short samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    assert "fix" in lines[0] or "valid" in lines[0]  # the fix, or the valid names
    return lines[0]


def test_train_eval_generate(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", *FAST_LM, "--out", run)
    assert code == 0
    assert "validation loss" in out and str(run) in out and "tok/s" in out
    code, out, _ = run_cli(capsys, "eval", run, "--split", "test", "--max-batches", "2", "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["step"] == 4 and metrics["split"] == "test"
    assert metrics["ppl"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    argv = ["generate", run, "--prompt", "import ", "--max-new-tokens", "20", "--seed", "3"]
    code, first, _ = run_cli(capsys, *argv)
    assert code == 0 and first.startswith("import ")
    assert run_cli(capsys, *argv)[1] == first  # same seed, same text
    code, greedy, _ = run_cli(capsys, *argv[:-2], "--temperature", "0")
    assert code == 0 and greedy.startswith("import ")


def test_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('task = "image-classification"\nsteps = 50\nbatch_size = 16\n')
    run = tmp_path / "run"
    code, out, _ = run_cli(
        capsys, "train", "--config", config, "--steps", "2", "--out", run, "--quiet"
    )
    assert code == 0 and "2 steps" in out
    saved = (run / "config.yaml").read_text()
    assert "task: image-classification" in saved and "steps: 2" in saved
    assert "batch_size: 16" in saved
    code, out, _ = run_cli(capsys, "eval", run)
    assert code == 0 and "accuracy" in out and "macro avg" in out  # per-label report


def test_resume_extends_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--task", "image-classification", "--quiet", "--out", run]
    assert run_cli(capsys, *base, "--steps", "2")[0] == 0
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--steps", "3", "--quiet")
    assert code == 0 and "3 steps" in out
    assert json.loads((run / "run.json").read_text())["resumed_from_step"] == 2


def write_conll(folder: Path, bad_line: str | None = None):
    folder.mkdir()
    sentence = "John B-PER\nlives O\nin O\nParis B-LOC\n\n"
    for name in ("train.txt", "dev.txt", "test.txt"):
        (folder / name).write_text(sentence * 40)
    if bad_line:
        (folder / "dev.txt").write_text(sentence + bad_line + "\n")


def test_token_classification_on_conll_folder(tmp_path, capsys):
    write_conll(tmp_path / "ner")
    run = tmp_path / "run"
    code, _, _ = run_cli(
        capsys,
        "train",
        "--task",
        "token-classification",
        "--data",
        tmp_path / "ner",
        "--steps",
        "30",
        "--lr",
        "3e-3",
        "--seq-len",
        "8",
        "--batch-size",
        "8",
        "--out",
        run,
        "--quiet",
    )
    assert code == 0
    code, out, _ = run_cli(capsys, "eval", run, "--split", "test")
    assert code == 0 and "entity level" in out and "B-PER" in out
    assert "entity_f1 1.0000" in out  # four words, learnt perfectly


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--task", "translation"], "unknown task 'translation'"),
        (["--recipe", "fp7"], "unknown recipe 'fp7'"),
        (["--model", "huge"], "huge"),
        (["--data", "{tmp}/missing"], "no such file, folder or glob"),
        (["--data", "{tmp}/empty"], "no text found"),
        (["--seq-len", "4096"], "exceeds the model's 1024 positions"),
        (["--config", "{tmp}/bad.yaml"], "bad.yaml: malformed config (line"),
        (["--task", "token-classification", "--data", "{tmp}/conll"], "dev.txt:6: one column"),
        (["--steps", "3", "--epochs", "1"], "only one of --steps/--epochs"),
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--device", "cuda:7"], "device 'cuda:7'"),
        (["--resume"], "no config.yaml"),
        (["--recipe", "bf16-mixed", "--loss-scale", "1024"], "bf16-mixed has no loss scaling"),
        (["--recipe", "fp16-mixed", "--loss-scale", "-1"], "loss scale must be a positive"),
        (["--recipe", "fp16-mixed", "--loss-scale", "1e40"], "at most 3.4e+38"),
        (
            ["--recipe", "fp16-low", "--loss-scale-growth-interval", "0"],
            "growth interval must be at least 1",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("steps: [3\n")
    write_conll(tmp_path / "conll", bad_line="Berlin")
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, "train", *argv, "--out", tmp_path / "run", "--quiet")
    assert code == 2
    assert expected in one_line_error(err)
    assert not (tmp_path / "run").exists()  # nothing written


def test_run_folder_with_another_run_is_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        run_cli(
            capsys,
            "train",
            "--task",
            "image-classification",
            "--steps",
            "1",
            "--out",
            run,
            "--quiet",
        )[0]
        == 0
    )
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", *FAST_LM, "--out", run)
    assert code == 2 and "already holds a run" in one_line_error(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_eval_and_generate_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path / "nope")
    assert code == 2 and "no such run folder" in one_line_error(err)
    run = tmp_path / "digits"
    run_cli(
        capsys, "train", "--task", "image-classification", "--steps", "1", "--out", run, "--quiet"
    )
    code, _, err = run_cli(capsys, "generate", run)
    assert code == 2 and "image-classification run" in one_line_error(err)


def test_out_that_is_a_file_is_refused_and_untouched(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = run_cli(capsys, "train", *FAST_LM, "--out", afile)
    assert code == 2 and "afile: exists and is not a folder" in one_line_error(err)
    assert afile.read_text() == "mine"


def test_too_little_validation_text_leaves_no_run_folder(tmp_path, capsys):
    from lowbit.data import split_of

    data = tmp_path / "texts"
    data.mkdir()
    for i in range(40):
        name = f"doc{i}.txt"
        short = split_of(name) == "validation"
        (data / name).write_text("x" if short else "def f(x):\n    return x + 1\n" * 10)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *FAST_LM, "--data", data, "--out", run)
    assert code == 2 and one_line_error(err)
    assert not run.exists()


def test_resume_changes_the_length_but_not_below_the_step_reached(tmp_path, capsys):
    run = tmp_path / "run"
    digits = ["--task", "image-classification", "--quiet"]
    assert run_cli(capsys, "train", *digits, "--steps", "4", "--out", run)[0] == 0
    saved = (run / "config.yaml").read_bytes()
    (tmp_path / "short.yaml").write_text("epochs: 0.01\n")
    for length, asked in [
        (["--steps", "2"], "steps 2"),
        (["--epochs", "0.01"], "epochs 0.01 (1 steps)"),
        (["--config", tmp_path / "short.yaml"], "epochs 0.01 (1 steps)"),
    ]:
        code, _, err = run_cli(capsys, "train", "--resume", run, *length, "--quiet")
        assert code == 2 and f"{asked} is below the run's step 4" in one_line_error(err)
        assert (run / "config.yaml").read_bytes() == saved
    # --epochs replaces the run's --steps: 0.3 of 19 steps per epoch (1257 digits / 64)
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--epochs", "0.3", "--quiet")
    assert code == 0 and "6 steps" in out


def test_resume_from_a_garbage_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    digits = ["--task", "image-classification", "--quiet", "--out", run]
    assert run_cli(capsys, "train", *digits, "--steps", "2", "--eval-interval", "1")[0] == 0
    newest = run / "checkpoints" / "step-0000002.pt"
    newest.write_bytes(b"/\x81\xb2\x93garbage")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--steps", "3", "--quiet")
    assert code == 2
    assert "step-0000002.pt: unreadable checkpoint" in one_line_error(err)
    assert "so that step-0000001.pt is the newest" in err
