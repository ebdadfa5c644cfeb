"""`lowbit train` config files, run folders and resume: a bug hunt through the public interfaces
(session 24)."""

import json
from dataclasses import replace

import pytest
import torch
import yaml

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, build_config, load_file, resolve, train
from lowbit.train.config import write

WORDS = ["def", "class", "import", "return", "self", "value", "print", "lambda", "yield", "async"]
TINY_RUN = ["--model", "nano", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]


def _corpus(path):
    """200 JSONL documents of a few words each."""
    with open(path, "w") as f:
        for i in range(200):
            text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(30))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def test_a_run_folder_of_a_newer_lowbit_is_refused_naming_its_version(tmp_path, capsys):
    """A config.yaml holding a setting this lowbit lacks was answered with the list of settings
    to choose from, as for a typo in the user's own --config file; a run folder is no file to
    correct: the run was written by a newer lowbit, and that is the fix."""
    run = tmp_path / "run"
    run.mkdir()
    write(TrainConfig(out=str(run)), run)
    with open(run / "config.yaml", "a") as config:
        config.write("shiny_new_setting: 3\n")
    (run / "run.json").write_text(json.dumps({"lowbit": "9.1.0"}))
    for argv in (["train", "--resume", str(run)], ["eval", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "'shiny_new_setting' is unknown to this lowbit" in err
        assert "written by lowbit 9.1.0; fix: use lowbit 9.1.0, which knows it" in err
    (run / "run.json").unlink()  # no version recorded: edited by hand, or a newer lowbit's
    assert main(["eval", str(run)]) == 2
    assert "or remove the line if it was added by hand" in capsys.readouterr().err
    typo = tmp_path / "run.yaml"  # the user's own file: the settings to choose from
    typo.write_text("learning_rate: 0.01\n")
    assert main(["train", "--config", str(typo)]) == 2
    assert "unknown setting 'learning_rate'; fix: use one of task, model" in capsys.readouterr().err


def test_a_config_files_run_and_model_folders_under_home_are_expanded(tmp_path, monkeypatch):
    """`out: ~/runs/x` in a config file wrote a folder named `~` in the current folder, and
    `model: ~/models/m` was not found; `data: ~/...` was always read from the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "run.yaml"
    path.write_text("out: ~/runs/x\nmodel: ~/models/m\ndata: ~/corpus.jsonl\n")
    config = resolve(build_config(load_file(path)))
    assert config.out == str(tmp_path / "home" / "runs" / "x")
    assert config.model == str(tmp_path / "home" / "models" / "m")


def test_resume_finds_the_run_folder_in_the_config_file(tmp_path, capsys, monkeypatch):
    """`lowbit train --config run.yaml --resume`, a job script's command after a preemption:
    the config file names the run folder (`out:`), as --out would."""
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "docs.jsonl")
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"data": "docs.jsonl", "out": "run", "steps": 3, "eval_interval": 2})
    )
    argv = ["train", "--config", "run.yaml", *TINY_RUN, "--quiet"]
    assert main([*argv, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "3 steps (completed)" in capsys.readouterr().out


def test_resume_takes_the_same_data_file_spelled_another_way(tmp_path, capsys, monkeypatch):
    """`--data ./docs.jsonl` (or its absolute path) names the file the run read as `docs.jsonl`:
    the resume was refused as a change of data, the message naming the same file twice."""
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "docs.jsonl")
    argv = ["train", *TINY_RUN, "--eval-interval", "2", "--quiet", "--out", "run"]
    assert main([*argv, "--data", "docs.jsonl", "--steps", "2"]) == 0
    for step, data in ((3, "./docs.jsonl"), (4, str(tmp_path / "docs.jsonl"))):
        capsys.readouterr()
        assert main(["train", "--resume", "run", "--data", data, "--steps", str(step)]) == 0
        assert f"{step} steps (completed)" in capsys.readouterr().out
    (tmp_path / "copy").mkdir()  # the same name and contents in another folder: another file
    _corpus(tmp_path / "copy" / "docs.jsonl")
    config = TrainConfig(data="copy/docs.jsonl", model="nano", out=str(tmp_path / "run"))
    with pytest.raises(UsageError, match=r"cannot resume with data 'copy/docs\.jsonl'"):
        train(config, resume=True, quiet=True)


def test_a_setting_spelled_twice_in_a_config_file_is_refused(tmp_path):
    """`eval-interval` and `eval_interval` are one setting: the later key silently won."""
    for name, text in (
        ("run.yaml", "eval-interval: 5\neval_interval: 6\n"),
        ("run.toml", "eval_interval = 5\neval-interval = 6\n"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match="are the same setting; fix: keep one"):
            load_file(tmp_path / name)


def test_the_restart_command_of_a_run_folder_with_a_space_pastes_into_a_shell(tmp_path, capsys):
    """The fixes that say to start a run again print its folder quoted, as `resume with:` does:
    `--out my run` pasted into a shell names two arguments."""
    run = tmp_path / "my run"
    run.mkdir()
    write(TrainConfig(model="nano", out=str(run)), run)  # stopped before its first checkpoint
    restart = f"lowbit train --config '{run}/config.yaml' --out '{run}'"
    assert main(["train", "--resume", str(run)]) == 2
    assert f"fix: start it again without --resume ({restart})" in capsys.readouterr().err
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000002.pt").write_bytes(b"torn")
    assert main(["eval", str(run)]) == 2
    assert f"move it away and start the run again ({restart})" in capsys.readouterr().err


def test_a_run_of_epochs_has_the_steps_they_make_not_one_more(tmp_path):
    """1.1 epochs of 50 steps are 55 steps; in floats 1.1 * 50 is 55.00000000000001, whose
    ceiling trained a 56th step."""
    from lowbit.train import Trainer

    config = TrainConfig(
        task="image-classification", model="tiny", batch_size=25, out=str(tmp_path)
    )
    for epochs, steps in ((1.1, 55), (1.0, 50), (0.51, 26)):
        trainer = Trainer(replace(config, epochs=epochs), quiet=True)
        assert trainer.task.steps_per_epoch() == 50  # 1257 training digits, batches of 25
        assert trainer.total_steps == steps


def test_non_finite_numbers_reach_tensorboard_as_numbers(tmp_path):
    """An SQNR of inf (an operand its format holds exactly) or a diverged loss reached
    metrics.jsonl as the strings JSON needs, and so never reached TensorBoard."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowbit.train.logging import METRICS, MetricsLogger

    logger = MetricsLogger(tmp_path, {})
    logger.log(3, "stats", {"sqnr": float("inf"), "loss": torch.tensor(float("nan")), "x": 0.5})
    logger.close()
    line = json.loads((tmp_path / METRICS).read_text())
    assert line == {"step": 3, "split": "stats", "sqnr": "inf", "loss": "nan", "x": 0.5}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("stats/sqnr")] == [(3, math.inf)]
    assert math.isnan(events.Scalars("stats/loss")[0].value)
    assert [e.value for e in events.Scalars("stats/x")] == [0.5]
