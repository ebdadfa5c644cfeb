"""Whether the run in a run folder is training now, ended, or died, for whatever reads the folder.

A run's run.json reads ``"status": "running"`` from its start until the run records how it ended;
a run killed with SIGKILL (``kill -9``, the out-of-memory killer, a node lost) records nothing, and
its run.json reads "running" for good. What tells a live run from a dead one is the folder's lock
(`RunLock`): the training process holds an exclusive ``flock`` on the folder while it writes it,
and the kernel drops that lock when the process ends, however it ends. Unlike a pid (reused by
another process after the run's died) or a heartbeat file (how old is too old, on a machine paused
or busy for minutes?) it cannot call a dead run live or a live one dead on the machine that trains
it. run.json also records the run's ``pid`` and ``host``, for the messages, and for the cases the
lock cannot tell: a file system without locks (then the pid is checked on the run's own host), and
a folder shared by another host whose locks this one may not see (some network file systems).
"""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path

from lowbit.errors import UsageError, warn
from lowbit.folder_lock import lock_folder


def process_fields() -> dict:
    """What run.json records of the process training the run: ``pid`` and ``host``."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


class RunLock:
    """An exclusive lock (``flock``) on a run folder while a process writes it: a second `lowbit
    train` into the folder of a live run (the same --out, or a --resume of it) is refused.
    Unlocked, it cleared the live run's files (a traceback there, the run lost) or trained beside
    it into the same checkpoints and metrics. The kernel drops the lock when the process ends
    however it ends, so a killed run leaves no stale lock; on a file system without locks (some
    network ones) run.json's pid on this host refuses a live run instead (`_refuse_live_pid`)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._fd: int | None = None

    def take(self) -> None:
        """Lock the folder, if it exists and is not locked by this lock already; where locks
        cannot be had (not POSIX; NFS, where an exclusive flock needs a file open to write),
        run.json's pid guards it (`_refuse_live_pid`)."""
        if self._fd is not None or not self.run_dir.is_dir():
            return
        held = lock_folder(self.run_dir)
        if held is False:
            raise busy_error(self.run_dir)
        if held is None:
            self._refuse_live_pid()
            return
        self._fd = held

    def _refuse_live_pid(self) -> None:
        """Without a lock, refuse a folder whose run.json says a live process on this host trains
        it (`state`'s fallback): unguarded, a second --resume trained beside it."""
        from lowbit.train.config import read_run_info

        info = read_run_info(self.run_dir)
        pid = info.get("pid")
        if (
            info.get("status") == "running"
            and info.get("host") in (None, socket.gethostname())
            and pid != os.getpid()
            and pid is not None
            and _pid_alive(pid)
        ):
            raise busy_error(self.run_dir)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def refuse_held(self) -> None:
        """Refuse (`take`'s error) the folder while another process holds it, leaving it unlocked:
        a check before anything is written there (`lowbit compare` wrote a live run's files
        before its trainer took the lock)."""
        self.take()
        self.release()


def busy_error(run_dir: Path) -> UsageError:
    """The refusal of a folder another process trains into."""
    return UsageError(
        f"{run_dir}: another lowbit process{_holder(run_dir)} is training into "
        "this folder; fix: wait until it ends (or stop it), or choose another --out"
    )


def _held(run_dir: Path) -> bool | None:
    """Whether a process holds ``run_dir``'s `RunLock` (this one's own counts too); None where it
    cannot be told (no ``flock``, a file system without locks, a folder that cannot be opened).
    The probe is `RunLock.take`'s own exclusive lock, dropped at once: where that cannot be taken
    (NFS, whose exclusive flock needs a file open to write), the run trained unlocked, and a
    shared probe that worked there called it dead."""
    held = lock_folder(run_dir)
    if held is None:
        return None
    if held is False:  # another process's
        return True
    os.close(held)  # drops the probe's lock with it
    return False


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # another user's process
        return True
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return True


def state(run_dir, info: dict | None = None) -> str | None:
    """The state of the run in ``run_dir``: run.json's status (``completed``, ``interrupted``,
    ``diverged``, ``aborted``, ``failed``), where it says ``running``: ``running`` while a process
    trains it, ``killed`` where none does (it died without a word), ``unknown`` where this machine
    cannot tell (`_held`); None where there is no run.json. ``info``: run.json, if read already."""
    from lowbit.train.config import read_run_info

    info = read_run_info(run_dir) if info is None else info
    status = info.get("status")
    if status != "running":
        return status
    held = _held(Path(run_dir))
    if held:
        return "running"
    # no host: a run.json from before it was recorded, taken as this machine's
    here = info.get("host") in (None, socket.gethostname())
    if held is False:  # another machine's lock may not be seen from here (some network folders)
        return "killed" if here else "unknown"
    if here and info.get("pid") is not None:
        return "running" if _pid_alive(info["pid"]) else "killed"
    return "unknown"


def _process(run_dir, info: dict | None = None) -> str:
    """`` (pid N on host H)`` of the process run.json records, or nothing."""
    from lowbit.train.config import read_run_info

    info = read_run_info(run_dir) if info is None else info
    if info.get("pid") is None:
        return ""
    return f" (pid {info['pid']} on host {info.get('host', '?')})"


def _holder(run_dir) -> str:
    """`_process` of the process that holds ``run_dir``'s lock, where run.json names it: a run
    starts (evaluates, loads its checkpoint) holding the lock before it writes its own run.json,
    and the one there until then may name an earlier process, gone."""
    from lowbit.train.config import read_run_info

    info = read_run_info(run_dir)
    here = info.get("host") == socket.gethostname()
    if info.get("status") != "running" or (here and not _pid_alive(info.get("pid"))):
        return ""
    return _process(run_dir, info)


def resume_command(run_dir) -> str:
    """The command that continues the run in ``run_dir``, quoted to paste into a shell."""
    return f"lowbit train --resume {shlex.quote(str(run_dir))}"


def checkpoints_present(out) -> frozenset:
    """The checkpoints in ``out`` now, each as (name, inode, modification time in ns): an
    --overwrite run's `kept_text` leaves these out, the run's it replaces until rank 0 clears
    them (a checkpoint written again under the same name is a new file, another inode). The
    files' own marks, not the clock: a network file system's server clock may lag this one's."""
    from lowbit.train import checkpoint

    folder = Path(os.path.expanduser(out))
    return frozenset(
        (path.name, (stat := path.stat()).st_ino, stat.st_mtime_ns)
        for path in checkpoint.list_checkpoints(folder)
        if path.exists()
    )


def kept_text(out, replaced: frozenset | None = None) -> str:
    """What a run stopped early (a rank failed or died, a Ctrl-C) left in ``out`` to resume
    from, and the command that does (a run stopped before its first checkpoint was told "the
    last complete checkpoint is intact" of none). ``replaced``: what `checkpoints_present` found
    as an --overwrite run started, the run it replaces: its checkpoints are not this run's, and
    their resume continued the old run. Without ``out`` the run folder's name (its start time)
    is not known here."""
    from lowbit.train import checkpoint

    if out is None:
        return "the last complete checkpoint is intact"
    saved = checkpoint.latest(Path(os.path.expanduser(out)))
    if saved is None:
        return "no checkpoint was written, nothing to resume"
    stat = saved.stat()
    if replaced is not None and (saved.name, stat.st_ino, stat.st_mtime_ns) in replaced:
        return "this run wrote no checkpoint of its own, nothing of it to resume"
    return f"the last complete checkpoint {saved} is intact; resume with: {resume_command(out)}"


def killed_text(run_dir, info: dict) -> str:
    """How a run that died without a word is described (`state` ``killed``)."""
    return (
        f"its process{_process(run_dir, info)} died after saving step {info.get('step')}: "
        "run.json still says running, but no process holds the folder (killed by SIGKILL or "
        "the out-of-memory killer, or its machine went down)"
    )


def resumed_text(run_dir, info: dict) -> str:
    """What a --resume (holding the folder now) says of a run whose run.json says running: died
    without a word (`killed_text`) where it ran on this machine, whose lock or pid would have
    refused a live one; where it ran on another host, this one cannot tell."""
    if info.get("host") in (None, socket.gethostname()):
        return killed_text(run_dir, info)
    return (
        f"run.json says running on another host{_process(run_dir, info)}; if it still "
        "runs there, stop this one (both would write the same checkpoints)"
    )


def unfinished_state(run_dir, info: dict | None = None) -> str | None:
    """`state` of a run that did not finish (``running``, ``killed``, ``unknown``,
    ``interrupted``, ``diverged``, ``aborted``, ``failed``): what `unfinished_note` says, and
    `lowbit eval --json` carries as ``run_state``; None for a finished run, or a folder without
    run.json."""
    now = state(run_dir, info)
    return None if now in (None, "completed") else now


def unfinished_note(run_dir, path: Path) -> str | None:
    """The note for a reader given no checkpoint (`lowbit eval`, quantize, generate) that picked
    ``path``, the latest of ``run_dir``'s, where the run did not finish: which step of how many it
    is, that the run is still training or stopped, and how to continue it. None for a finished run
    (or a folder without run.json)."""
    from lowbit.train.config import read_run_info

    info = read_run_info(run_dir)
    return state_note(run_dir, path, info, unfinished_state(run_dir, info))


def state_note(run_dir, path: Path, info: dict, now: str | None) -> str | None:
    """`unfinished_note` of a run whose `unfinished_state` is ``now``, worked out already (`lowbit
    eval` says it, and --json carries it: one probe, or they may disagree)."""
    from lowbit.train.checkpoint import step_of

    if now is None:
        return None
    total = info.get("total_steps")
    using = f"using its latest checkpoint, step {step_of(path)}" + (f" of {total}" if total else "")
    resume = f"; resume with: {resume_command(run_dir)}"
    if now == "running":
        return f"{run_dir}: the run is still training{_process(run_dir, info)}; {using}"
    if now == "killed":
        return f"{run_dir}: the run did not finish: {killed_text(run_dir, info)}; {using}{resume}"
    if now == "unknown":
        return (
            f"{run_dir}: the run did not finish, or is still training on another machine "
            f"(run.json says running{_process(run_dir, info)}, and this machine cannot tell); "
            f"{using}; if it is not running, resume with: {resume_command(run_dir)}"
        )
    step = info.get("step")
    why = f"{now} at step {step}" if step is not None else now
    if now == "diverged":  # resumed, it diverges again: the fix is in the error it recorded
        resume = ""
    return f"{run_dir}: the run did not finish ({why}); {using}{resume}"


def note_unfinished(run_dir, path: Path) -> None:
    """`unfinished_note` as a warning, if there is one."""
    note = unfinished_note(run_dir, path)
    if note is not None:
        warn(note)
