import itertools
import math

import pytest

from lowbit.errors import UsageError
from lowbit.train.config import (
    TrainConfig,
    build_config,
    ignored_settings,
    load_file,
    lr_at,
    resolve,
)


def test_flags_override_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: image-classification\nlr: 0.01\nbatch-size: 8\nsteps: 5\n")
    config = resolve(build_config(load_file(path), {"lr": 0.002, "steps": None}))
    assert (config.task, config.lr, config.batch_size, config.steps) == (
        "image-classification",
        0.002,
        8,
        5,
    )
    assert config.min_lr == pytest.approx(0.0002)  # default lr / 10 of the overriding lr


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('recipe = "fp16-mixed"\nsteps = 7\n')
    assert build_config(load_file(path)).recipe == "fp16-mixed"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.yaml", "steps: 3\n  lr: [1\n", "bad.yaml: malformed config (line 2"),
        ("bad.toml", "steps = 3\nlr = = 1\n", "bad.toml: malformed config"),
        ("list.yaml", "- 1\n- 2\n", "a config is a mapping"),
        ("keys.yaml", "stepz: 3\n", "unknown setting 'stepz'"),
        ("types.yaml", "steps: many\n", "steps must be an integer"),
        ("x.ini", "steps=3\n", "unknown config type '.ini'"),
    ],
)
def test_malformed_config_is_one_line_usage_error(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match="fix") as error:
        build_config(load_file(path))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_resolve_checks_values():
    with pytest.raises(UsageError, match="unknown task 'cnn'"):
        resolve(TrainConfig(task="cnn"))
    with pytest.raises(UsageError, match="only one of --steps/--epochs"):
        resolve(TrainConfig(steps=3, epochs=1))
    with pytest.raises(UsageError, match="batch_size must be positive"):
        resolve(TrainConfig(batch_size=0))
    with pytest.raises(UsageError, match="min_lr"):
        resolve(TrainConfig(lr=1e-3, min_lr=1e-2))


def test_task_defaults_and_run_folder_name():
    config = resolve(TrainConfig())
    assert (config.steps, config.batch_size, config.seq_len) == (400, 16, 256)
    assert config.out.startswith("runs/causal-lm-bf16-mixed-")
    assert config.save_interval == config.eval_interval


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    config = resolve(TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, steps=104))
    lrs = [lr_at(config, step, 104) for step in range(104)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert lrs[54] == pytest.approx(0.55)  # half way down the cosine
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lr_at(config, 104, 104) == pytest.approx(0.1)
    assert not any(math.isnan(x) for x in lrs)


def test_yaml_1_1_numbers_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-4\nsteps: 1e3\nwandb: 'false'\n")
    config = build_config(load_file(path))
    assert (config.lr, config.steps, config.wandb) == (3e-4, 1000, False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wandb: 'no'\n", "wandb must be true or false, got 'no'"),
        ("out: 5\n", "out must be a string, got 5"),
        ("data: [a, b]\n", "data must be one path or glob, got ['a', 'b']"),
    ],
)
def test_settings_of_the_wrong_type_are_refused(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match="; fix: ") as error:
        build_config(load_file(path))
    assert expected in str(error.value)


def test_a_config_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"steps: 3\n\xe9\n")
    with pytest.raises(
        UsageError, match=r"run.yaml: not UTF-8 text \(byte 0xe9 at offset 9, line 2\); fix"
    ):
        load_file(path)


def test_a_length_flag_replaces_the_files_length(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\n")
    config = resolve(build_config(load_file(path), {"epochs": 0.5}))
    assert (config.steps, config.epochs) == (None, 0.5)
    with pytest.raises(UsageError, match="only one of --steps/--epochs"):
        resolve(build_config(load_file(path), {"steps": 3, "epochs": 0.5}))


@pytest.mark.parametrize(
    "settings, ignored",
    [
        ({"task": "image-classification", "seq_len": 64}, ["seq_len"]),
        ({"task": "image-classification", "text_field": "body"}, ["text_field"]),
        ({"task": "token-classification", "tokenizer": "bpe"}, ["tokenizer"]),
        ({"task": "causal-lm", "vocab_size": 512}, ["vocab_size"]),  # byte tokens: no vocab size
        ({"task": "causal-lm", "tokenizer": "bpe", "vocab_size": 512}, []),
        ({"task": "token-classification", "seq_len": 32}, []),
        ({"task": "image-classification"}, []),  # its defaults are not the user's settings
    ],
)
def test_settings_a_task_does_not_read_are_named(settings, ignored):
    lines = ignored_settings(resolve(TrainConfig(**settings)))
    assert [line.split(" ")[0] for line in lines] == ignored
    assert all(line.endswith("; ignored") for line in lines)


def test_train_warns_about_a_flag_its_task_ignores(tmp_path, capsys):
    from lowbit.cli import main

    argv = ["train", "--task", "image-classification", "--seq-len", "64", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "seq_len (--seq-len) does not apply to task image-classification; ignored" in err


def test_a_write_interrupted_before_it_lands_leaves_the_old_config(tmp_path, monkeypatch):
    """config.yaml is replaced whole: a kill mid-write (Ctrl-C as a resume starts) must not leave
    a torn file that the next --resume misreads."""
    from lowbit.train.config import read, write

    write(resolve(TrainConfig(steps=5, out=str(tmp_path))), tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(resolve(TrainConfig(steps=9, out=str(tmp_path))), tmp_path)
    assert read(tmp_path).steps == 5
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left
