"""A resume refused for a changed setting names the flag that sets it, the run's value as flags to
paste, and the fix: it named the config key alone ("cannot resume with optimizer_state '8bit'";
fix: "drop that setting", of a setting a config file may have given) and listed the settings a
resume may change as keys (eval_interval) that no command line takes."""

import re
import shlex
import shutil

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import train
from lowbit.train.config import read

TINY = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step nano run on the built-in data (read only: a test that resumes it copies it). One
    per xdist worker, not per session: the refused resumes take and drop the run's lock, and two
    workers' at the same moment would find it held."""
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(run), "--quiet"]) == 0
    return run


def _files(run) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(run.rglob("*"))}


def _refused(run, capsys, *argv) -> str:
    """The one-line error of a refused ``lowbit train --resume RUN ARGV``, which left ``run``
    as it was."""
    before = _files(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: error: ")
    assert _files(run) == before
    return err


@pytest.mark.parametrize(
    ("given", "named", "runs"),
    [
        (
            ["--optimizer-state", "8bit"],
            "optimizer_state '8bit' (--optimizer-state): the run was trained with 'fp32'",
            "--optimizer-state fp32",
        ),
        (
            ["--batch-size", "8"],
            "batch_size 8 (--batch-size): the run was trained with 4",
            "--batch-size 4",
        ),
        (
            ["--seq-len", "32"],
            "seq_len 32 (--seq-len): the run was trained with 16",
            "--seq-len 16",
        ),
        (
            ["--recipe", "fp32"],
            "recipe 'fp32' (--recipe): the run was trained with 'bf16-mixed'",
            "--recipe bf16-mixed",
        ),
    ],
)
def test_a_refused_resume_names_the_flag_and_the_runs_value(run, capsys, given, named, runs):
    err = _refused(run, capsys, *given)
    assert f"cannot resume with {named}" in err
    assert f"fix: resume with the run's {runs} or without {given[0]}, or start a new run" in err
    assert "another --out" in err
    # the settings a resume may change, as flags
    assert "--eval-interval, --keep-last, --nproc, --out" in err and "eval_interval" not in err


def test_a_setting_the_run_had_none_of_is_to_be_left_out(run, tmp_path, capsys):
    """The run's value is no flag at all (no --override): "without" it, on the command line or in
    a --config file; --data naming another file was refused as data whose contents changed
    ("restore the data"), and the built-in data the run read is --data stdlib."""
    err = _refused(run, capsys, "--override", "lm_head=keep")
    assert "cannot resume with overrides ['lm_head=keep'] (--override)" in err
    assert (
        "fix: resume without --override or a --config file's overrides, or start a new run with "
        "another --out"
    ) in err
    other = tmp_path / "other.txt"
    other.write_text("".join(f"paragraph {i}: other words.\n\n" for i in range(200)))
    err = _refused(run, capsys, "--data", str(other))
    assert (
        f"cannot resume with data {str(other)!r} (--data): the run was trained with its default"
        in err
    )
    assert "fix: resume with the run's --data stdlib or without --data" in err
    assert "other contents" not in err


def test_no_clipping_is_told_as_the_grad_clip_0_that_gives_it(run, tmp_path, capsys):
    """A run trained with --grad-clip 0 (kept as None, "measure only") was said to be "trained with
    its default", which is 1.0, with the fix "resume without --grad-clip", which a --config file's
    grad_clip defeats; a file's `grad_clip: 0` was refused as "grad_clip None"."""
    settings = tmp_path / "settings.yaml"
    settings.write_text("grad_clip: 0\n")
    err = _refused(run, capsys, "--config", str(settings))
    assert "cannot resume with grad_clip 0 (--grad-clip): the run was trained with 1.0;" in err
    unclipped = tmp_path / "unclipped"
    argv = ["train", *TINY, "--steps", "2", "--grad-clip", "0", "--out", str(unclipped)]
    assert main([*argv, "--quiet"]) == 0
    err = _refused(unclipped, capsys, "--grad-clip", "1")
    assert "cannot resume with grad_clip 1.0 (--grad-clip): the run was trained with 0;" in err
    assert "fix: resume with the run's --grad-clip 0 or without --grad-clip" in err
    settings.write_text("grad_clip: 0.5\n")
    _pasted(unclipped, capsys, ["--config", str(settings)])


def test_the_built_in_data_as_the_message_gives_it_resumes_over_a_config_file(
    run, tmp_path, capsys
):
    """A run on the built-in data, resumed with a --config file naming other data: "resume
    without --data" did nothing there; the run's --data stdlib overrides the file's."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    other = tmp_path / "other.txt"
    other.write_text("".join(f"paragraph {i}: other words.\n\n" for i in range(200)))
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"data: {other}\n")
    _pasted(copy, capsys, ["--config", str(settings)])


def _pasted(run, capsys, argv, steps: int = 3) -> None:
    """Resume ``run`` with ``argv`` (a setting changed), refused, then with the flags the
    refusal's fix gives as the run's value added, which resumes to ``steps``."""
    err = _refused(run, capsys, *argv)
    fix = re.search(r"fix: resume with the run's (.+?) or without", err).group(1)
    capsys.readouterr()
    resumed = ["train", "--resume", str(run), *argv, *shlex.split(fix), "--steps", str(steps)]
    assert main(resumed) == 0
    assert f"{steps} steps (completed)" in capsys.readouterr().out


def test_the_runs_value_as_the_message_gives_it_resumes_over_a_config_file(run, tmp_path, capsys):
    """The fix's flags paste into a shell and override a --config file's setting, which "drop
    that setting" did not (the flag was never given); a derived min_lr (lr / 10, a float of many
    digits) reads back as the same value."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    settings = tmp_path / "settings.yaml"
    settings.write_text("optimizer_state: 8bit\n")
    _pasted(copy, capsys, ["--config", str(settings)])
    _pasted(copy, capsys, ["--min-lr", "0.001"], steps=4)


def test_a_script_is_told_the_setting_and_its_flag(run):
    """`train(config, resume=True)` raises the same message: the TrainConfig field first."""
    config = read(run)
    config.lr = 0.5
    before = _files(run)
    with pytest.raises(UsageError, match=r"cannot resume with lr 0\.5 \(--lr\): .* with 0\.003;"):
        train(config, resume=True, quiet=True)
    assert _files(run) == before


def test_every_setting_a_resume_refuses_is_named_by_a_flag_of_lowbit_train(capsys):
    """The message names each setting's flag as `flag_of` derives it from the field's name: one
    that `lowbit train` does not take would send the user to a flag that does not exist."""
    from lowbit.train.config import TrainConfig, flag_of
    from lowbit.train.trainer import RESUMABLE_CHANGES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    usage = capsys.readouterr().out
    flags = {flag_of(name) for name in TrainConfig.field_names()}
    assert {flag for flag in flags if f"{flag} " not in usage} == set()
    assert RESUMABLE_CHANGES.issubset(TrainConfig.field_names())
