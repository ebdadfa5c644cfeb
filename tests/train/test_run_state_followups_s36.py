"""Review follow-ups of the run-state work (session 36): a live run on a file system whose
exclusive locks fail (NFS: an exclusive flock needs a file open for writing, a folder cannot be)
is neither called dead nor trained beside; a --resume of a run recorded on another host does not
say it died; a --config file is not to be removed (session 36)."""

import errno
import fcntl
import json
import socket
import subprocess
import sys

import pytest

from tests.train.test_run_state_s36 import NANO, run_cli


@pytest.fixture
def unfinished_run(tmp_path, capsys):
    """A 4-step run as a stop after its step-2 checkpoint leaves it: run.json says "running"."""
    run = tmp_path / "run"
    argv = ["train", *NANO, "--steps", "4", "--eval-interval", "2", "--quiet", "--out", run]
    assert run_cli(capsys, *argv)[0] == 0
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    info.update(status="running", step=2)
    del info["final_metrics"], info["final_metrics_step"]
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    (run / "checkpoints" / "step-0000004.pt").unlink()
    return run


@pytest.fixture
def live_run(unfinished_run):
    """``unfinished_run`` whose recorded process (on this host) is alive."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    info = json.loads((unfinished_run / "run.json").read_text(encoding="utf-8"))
    info.update(pid=live.pid, host=socket.gethostname())
    (unfinished_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    yield unfinished_run
    live.kill()
    live.wait()


@pytest.fixture
def no_exclusive_locks(monkeypatch):
    """Every exclusive flock fails as on NFS (a folder is not open for writing); shared ones work."""
    flock = fcntl.flock

    def nfs_flock(fd, operation):
        if operation & fcntl.LOCK_EX:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)


def test_a_live_run_unlocked_is_not_called_killed(live_run, no_exclusive_locks, capsys):
    """The probe (a shared lock) worked where the run's exclusive one had failed: "killed"."""
    code, _, err = run_cli(capsys, "eval", live_run, "--max-batches", "1")
    assert code == 0
    assert err.startswith(f"lowbit: warning: {live_run}: the run is still training (pid ")


def test_a_resume_beside_a_live_unlocked_run_is_refused(unfinished_run, no_exclusive_locks, capsys):
    """Unlocked, the second --resume trained beside the live run into the same checkpoints; once
    the recorded process is gone, the run resumes."""
    live_run = unfinished_run
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    info = json.loads((live_run / "run.json").read_text(encoding="utf-8"))
    info.update(pid=live.pid, host=socket.gethostname())
    (live_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    pid = live.pid
    code, _, err = run_cli(capsys, "train", "--resume", live_run, "--quiet")
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {live_run}: another lowbit process (pid {pid} on host "
        f"{socket.gethostname()}) is training into this folder; fix: wait until it ends (or stop "
        "it), or choose another --out"
    )
    assert not (live_run / "checkpoints" / "step-0000004.pt").exists()
    live.kill()
    live.wait()
    code, _, err = run_cli(capsys, "train", "--resume", live_run, "--quiet")
    assert code == 0
    assert f"its process (pid {pid} on host" in err and "died after saving step 2" in err


def test_a_resume_of_a_run_recorded_on_another_host_does_not_say_it_died(unfinished_run, capsys):
    """Its lock may not be seen from here: it may still train there."""
    info = json.loads((unfinished_run / "run.json").read_text(encoding="utf-8"))
    info["host"] = "another-machine"
    (unfinished_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--resume", unfinished_run, "--quiet")
    assert code == 0
    assert "died" not in err
    assert err.strip() == (
        f"lowbit: note: {unfinished_run}: run.json says running on another host (pid "
        f"{info['pid']} on host another-machine); if it still runs there, stop this one (both "
        "would write the same checkpoints); resuming from its checkpoint at step 2"
    )


@pytest.mark.parametrize(
    "data",
    [b"steps: 3\nrecipe: bf16-mixed # caf\xe9\n", b"steps: 3 # \xc3\xa9 \xe9\n", b"steps: 3\0\n"],
)
def test_a_config_file_in_another_encoding_is_not_to_be_removed(tmp_path, capsys, data):
    """--data's reader closed its fix with "or remove it": for a config, "delete your settings"."""
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    code, _, err = run_cli(capsys, "train", *NANO, "--config", path, "--out", tmp_path / "out")
    assert code == 2
    assert err.startswith(f"lowbit: error: {path}: ") and "UTF-8" in err
    assert "remove it" not in err
    assert not (tmp_path / "out").exists()


def test_eval_json_and_its_warning_agree_on_a_run_that_ends_meanwhile(
    unfinished_run, monkeypatch, capsys
):
    """The state was worked out twice (the warning's, --json's): a run that ended between the two
    was warned of as still training and reported killed."""
    flock, probes = fcntl.flock, []

    def ends_after_the_first_probe(fd, operation):
        probes.append(operation)
        if len(probes) == 1:  # the run holds its folder until just after the first probe
            raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", ends_after_the_first_probe)
    code, out, err = run_cli(capsys, "eval", unfinished_run, "--max-batches", "1", "--json")
    assert code == 0
    assert err.startswith(f"lowbit: warning: {unfinished_run}: the run is still training")
    assert json.loads(out)["run_state"] == "running"
