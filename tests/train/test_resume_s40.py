"""Session 40: a resume refused for its checkpoint's bytes or its data says so in one line, before
the start-up lines of the run it does not start (layers kept, CPU emulation); a resume of a
finished run says that it trains nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import checkpoint
from tests.once import run_once_per_session

DIGITS = ["--task", "image-classification", "--batch-size", "4", "--recipe", "fp8-tensorwise"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits run at step 4, checkpoints at steps 2 and 4; its recipe prints start-up lines.
    Trained once per session (tests change a copy: `run`)."""

    argv = ["train", *DIGITS, "--steps", "4", "--save-interval", "2", "--eval-interval", "4"]
    return run_once_per_session(tmp_path_factory, "resume-s40", argv)


@pytest.fixture
def run(digits_run, tmp_path, capsys):
    """A copy of the digits run, to change."""
    copy = tmp_path / "run"
    shutil.copytree(digits_run, copy)
    capsys.readouterr()
    return copy


def _refusal(run, capsys) -> str:
    """The one line of `lowbit train --resume RUN --steps 6`, which is refused (exit 2)."""
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def _change(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_a_checkpoint_cut_short_is_refused_in_one_line(run, capsys):
    """Its early read failed without a word, and the full load named it after the start-up lines,
    in torch's words ("[Errno 22] Invalid argument")."""
    newest = checkpoint.latest(run)
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    assert _refusal(run, capsys) == (
        f"lowbit: error: {newest}: unreadable checkpoint (not a whole zip archive: cut short (an "
        "interrupted save or copy), or another kind of file); fix: move it out of "
        f"{newest.parent}, so that step-0000002.pt is the newest"
    )


def test_a_missing_checkpoint_file_keeps_its_errno(tmp_path):
    """Not described as a zip archive cut short (review R3): a DCP folder's lowbit.pt gone."""
    with pytest.raises(UsageError) as caught:
        checkpoint.read_file(tmp_path / "lowbit.pt")
    assert "zip" not in str(caught.value)
    assert "No such file or directory" in str(caught.value)


def test_a_setting_changed_in_the_checkpoint_file_is_refused_as_its_bytes(run, capsys):
    """A byte changed in the pickle that holds the config was read as the run's setting, and the
    resume refused as if the user had changed the task."""
    newest = checkpoint.latest(run)
    _change(newest, b"image-classification", b"image-classificatiom")
    assert _refusal(run, capsys) == (
        f"lowbit: error: {newest}: unreadable checkpoint (its record archive/data.pkl fails its "
        "CRC-32 check: the file changed since it was saved); fix: move it out of "
        f"{newest.parent}, so that step-0000002.pt is the newest"
    )


def test_data_changed_since_the_run_is_refused_before_the_start_up_lines(run, capsys):
    """`_check_same_data` ran as the checkpoint loaded, after the start-up lines."""
    info = json.loads((run / "run.json").read_text())
    info["data_fingerprint"]["train"]["images"] += 1  # as if the data held another image
    (run / "run.json").write_text(json.dumps(info))
    line = _refusal(run, capsys)
    assert line.startswith(f"lowbit: error: cannot resume {run}: its data (built-in) holds other")


def test_a_resume_of_a_finished_run_says_it_trains_nothing(run, capsys):
    """Without a longer --steps it printed the run's summary again, as if it had trained."""
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (
        f"lowbit: note: {run} has trained its 4 steps already; to train it on, resume with "
        "--steps above 4\n"
    ) in capsys.readouterr().err
