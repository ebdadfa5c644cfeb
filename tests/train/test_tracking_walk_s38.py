"""Session 38: a user who trains and watches runs (W&B, metrics, config files)."""

import json
import sys
import types

import pytest
import yaml

import lowbit.train.trainer as trainer_module
from lowbit.cli import main

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]


def _train(*args: str) -> int:
    return main(["train", *NANO, "--warmup-steps", "0", *args])


def _small_data(folder) -> str:
    """A small Python file to train on, read faster than the standard library."""
    data = folder / "code.py"
    data.write_text("".join(f"def f{i}():\n    return {i}\n\n" for i in range(300)))
    return str(data)


class _FakeWandb(types.ModuleType):
    """What `lowbit train --wandb` asks of the wandb package, recorded: ``inits`` holds each
    `wandb.init`'s arguments, ``exit_codes`` each finish's (the wandb package is not a
    dependency of the tests)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.exit_codes: list[int] = []  # each `run.finish`'s

    def Settings(self, **options):  # wandb's name
        return options

    def init(self, **options):
        self.inits.append(options)
        number = len(self.inits)
        return types.SimpleNamespace(
            id=options["id"] or f"run{number}",
            log=lambda *a, **k: None,
            finish=lambda exit_code=0: self.exit_codes.append(exit_code),
        )


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch, capsys):
    """Each `wandb.init` drew a new id, so a run resumed after Ctrl-C (or a preemption) was a
    second W&B run beside the first, and `wandb sync` uploaded the run in pieces. W&B's lines,
    25 at the end of a run, are none under --quiet; the sync command is in lowbit's own."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "run")
    data = _small_data(tmp_path)
    assert _train("--data", data, "--steps", "1", "--wandb", "--out", out, "--quiet") == 0
    assert f"  |  wandb sync {out}/wandb/offline-run-*\n" in capsys.readouterr().out
    assert _train("--resume", out, "--steps", "2", "--quiet") == 0
    first, resumed = fake.inits
    assert first["id"] is None and resumed["id"] == "run1"  # the first run's id, kept
    assert resumed["resume"] == "allow"
    assert first["settings"]["silent"] and resumed["settings"]["silent"]
    assert fake.exit_codes == [0, 0]


def test_a_diverged_run_is_a_failed_wandb_run(tmp_path, monkeypatch):
    """A run stopped by an error (here a non-finite gradient) was "finished" in W&B, as a
    completed one."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    argv = ["--lr", "1e30", "--grad-clip", "0", "--steps", "3", "--wandb", "--quiet"]
    assert _train(*argv, "--out", str(tmp_path / "run")) == 1  # diverged at step 2
    assert fake.exit_codes == [1]


def test_a_config_files_data_beside_it_names_the_working_folder(tmp_path, monkeypatch, capsys):
    """A relative ``data:`` is read from the working folder, as on the command line; a config
    file kept beside its data and given from elsewhere was told "no such file" of a file the
    user could see, without a word on where the path was read from."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "code.py").write_text("def f():\n    return 1\n" * 50)
    config = tmp_path / "exp" / "run.yaml"
    config.write_text("data: code.py\nsteps: 1\n")
    monkeypatch.chdir(tmp_path)
    assert _train("--config", "exp/run.yaml", "--out", "run", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowbit: error: exp/run.yaml: data 'code.py' does not exist in the working folder "
        f"{tmp_path}, which a relative path is read from, not the file's folder; fix: data: "
        "exp/code.py (or an absolute path) in the file"
    )
    assert not (tmp_path / "run").exists()


def test_skipped_steps_are_logged_each_step(tmp_path):
    """A loss-scaled run's skipped steps were in its closing summary only: its curves showed the
    loss scale halving, and no count a user could plot or grep beside the loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--recipe", "fp16-mixed", "--loss-scale", "1e30", "--steps", "2", "--out", str(out)]
    assert _train(*argv, "--quiet") == 0  # 1e30 overflows fp16 gradients: both steps skipped
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["split"] == "train"] == [1, 2]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/skipped_steps")
    assert [(s.step, s.value) for s in scalars] == [(1, 1.0), (2, 2.0)]


def test_a_model_config_or_run_record_given_as_config_names_the_right_flag(tmp_path, capsys):
    """A Hugging Face config.json (``--model``'s) or a run's run.json given to ``--config`` was
    "unknown setting 'architectures'" (or 'conversion') and the list of every setting."""
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": 1}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 1\n")
    (run / "run.json").write_text('{"task": "causal-lm", "conversion": {}}')
    expected = {
        model / "config.json": "a Hugging Face model config, not training settings; fix: "
        f"--model {model} to train that model (--config takes a file of training settings)",
        run / "run.json": "a run's record, not its settings; fix: --config "
        f"{run / 'config.yaml'}, the run's settings",
    }
    for path, text in expected.items():
        assert _train("--config", str(path), "--out", str(tmp_path / "new"), "--quiet") == 2
        assert capsys.readouterr().err.strip() == f"lowbit: error: {path}: {text}"
    assert not (tmp_path / "new").exists()


def test_stats_of_a_recipe_that_converts_no_layer_are_warned_of(tmp_path, capsys):
    """``--recipe bf16-mixed --stats-interval 1`` logged no statistics, and said nothing: the
    statistics measure the layers a recipe converts, and bf16-mixed computes under autocast."""
    out = tmp_path / "run"
    argv = ["--recipe", "bf16-mixed", "--stats-interval", "1", "--steps", "1", "--out", str(out)]
    assert _train(*argv, "--quiet") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--stats-interval" in line]
    assert warnings == [
        "lowbit: warning: --stats-interval: recipe bf16-mixed converts no layer, so no numerics "
        "statistics are logged (they measure the layers a recipe converts); fix: a recipe with "
        "low-precision layers (lowbit recipes), or no --stats-interval"
    ]
    assert '"stats"' not in (out / "metrics.jsonl").read_text()


def test_config_files_named_in_capitals_are_read_and_a_folder_is_named_as_one(tmp_path, capsys):
    """``RUN.YAML`` was "unknown config type '.YAML'", and a folder of one's own (not a run's)
    "no such config file; fix: check the path" of a path that exists."""
    config = tmp_path / "RUN.YAML"
    config.write_text(f"steps: 1\ndata: {_small_data(tmp_path)}\n")
    out = tmp_path / "run"
    assert _train("--config", str(config), "--out", str(out), "--quiet") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 1
    capsys.readouterr()
    assert _train("--config", str(tmp_path), "--out", str(tmp_path / "new"), "--quiet") == 2
    assert capsys.readouterr().err.strip() == (
        f"lowbit: error: {tmp_path}: a folder, not a config file; fix: --config FILE, a .yaml, "
        ".yml, .toml, .json file of settings"
    )


def _interrupt_at_step_2(monkeypatch, wrapped: bool) -> None:
    """The run's step 2 meets a Ctrl-C: a KeyboardInterrupt, or (``wrapped``) the RuntimeError
    Python raises in its place where one lands in a class's ``__set_name__``."""
    step = trainer_module.Trainer.step

    def interrupted(self):
        if self.step_idx != 2:
            return step(self)
        if not wrapped:
            raise KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError(
                "Error calling __set_name__ on '_tuplegetter' instance"
            ) from interrupt

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)


@pytest.mark.parametrize("wrapped", [False, True], ids=["KeyboardInterrupt", "RuntimeError"])
def test_a_run_the_user_aborted_is_aborted_not_failed(tmp_path, monkeypatch, capsys, wrapped):
    """A Ctrl-C wrapped in a RuntimeError was printed "lowbit: interrupted" by the command but
    recorded "failed" in run.json; and every abort was marked failed in W&B (exit code 1), as a
    run stopped by an error, where the user stopped it (as one Ctrl-C does, finished there)."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _interrupt_at_step_2(monkeypatch, wrapped)
    out = tmp_path / "run"
    argv = ["--data", _small_data(tmp_path), "--steps", "4", "--wandb", "--out", str(out)]
    assert _train(*argv, "--quiet") == 130
    assert "Traceback" not in capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    assert (info["status"], info["error"]) == ("aborted", "KeyboardInterrupt after step 2")
    assert fake.exit_codes == [0]
