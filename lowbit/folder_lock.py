"""An exclusive ``flock`` on a folder, tried without waiting.

The operating system drops such a lock however its process ends (a crash, SIGKILL, the OOM
killer), so it tells a live holder from a dead one where a lock file or a recorded pid cannot:
a run folder's trainer holds one while it trains (`lowbit.train.runstate`), and of the processes
waiting for one kernel build the holder says so for all (`lowbit.kernels`).
"""

from __future__ import annotations

import os
from pathlib import Path


def lock_folder(folder: Path) -> int | bool | None:
    """The descriptor that holds an exclusive ``flock`` on ``folder`` (close it to drop the lock),
    False when another process holds one, None where it cannot be told: no ``fcntl`` (not POSIX),
    a folder that cannot be opened, or a file system without such locks (NFS, where an exclusive
    flock needs a file open to write)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        return False if isinstance(error, BlockingIOError) else None
    return fd
