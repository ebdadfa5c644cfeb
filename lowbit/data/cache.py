"""An on-disk cache of derived data that is slow to compute and a pure function of its inputs.

Built for the token-classification task's tagged stdlib files (`lowbit.data.syntax_tags`), which
every process that builds the task (each `lowbit compare --jobs` worker, each test subprocess)
took seconds to recompute, and a pretrained tokenizer's pieces of their words (and the digits
task's split). Entries are plain JSON, never pickle: a cache folder is not a place to trust code
from.

Where: ``$LOWBIT_CACHE_DIR`` if set (set and empty turns the cache off), else
``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``. Each user of the cache names a
*generation*: everything its entries depend on besides their own key (its code, Python's
version). A process that starts a new generation deletes all but the `KEPT_GENERATIONS` most
recent ones beside it, so upgrades of lowbit or Python never grow the folder without bound.
Within a generation, a user whose keys vary with the run's settings (a tokenizer, a length) bounds
its number of entries: writing one past the bound deletes the least recently used (by the
entry file's modification time, which a read refreshes).

The cache never fails a run. An entry is one file written whole and renamed into place
(`os.replace`), so concurrent processes read either nothing or a whole entry (two writing one
entry at once each rename a whole file over it); an entry that cannot be read, is cut short, was
edited (its payload no longer matches the checksum in its header) or belongs to another key is a
miss, recomputed and rewritten; a folder that cannot be written (read-only home, full disk) just
leaves every lookup a miss, without a warning. A write that fails or is interrupted (Ctrl-C)
removes its temporary file; one that a killed process (SIGKILL, the OOM killer) left behind is
removed once it is `STALE_SECONDS` old, by the next process to use its generation
(`_remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

FORMAT = 1  # the layout of an entry file below; a change makes older entries misses
KEPT_GENERATIONS = 4  # generations kept per user: a few lowbit/Python versions side by side
TEMPORARY = ".tmp-"  # the name's start of an entry file being written, before its rename
# A temporary file unchanged this long is taken for one whose writer was killed: a live one is
# renamed within seconds of its last write (see `_remove_stale_temporaries`).
STALE_SECONDS = 3600
_swept: set[Path] = set()  # the generations this process has swept of stale temporary files


def cache_root() -> Path | None:
    """The cache folder, or None where the cache is off (or no home folder is known)."""
    if "LOWBIT_CACHE_DIR" in os.environ:
        given = os.environ["LOWBIT_CACHE_DIR"]
        return Path(given).expanduser() if given else None
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative path is invalid and ignored
        return Path(xdg) / "lowbit"
    try:
        return Path.home() / ".cache" / "lowbit"
    except RuntimeError:  # no HOME and no passwd entry
        return None


def digest(*parts: str | bytes) -> str:
    """sha256 of the parts, each length-prefixed so that no two lists of parts collide."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", errors="surrogatepass") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class JsonCache:
    """JSON values by key (a hex digest) under ``<root>/<name>/<generation>/``.

    An entry file is two lines: a JSON header (format, key, sha256 of the second line) and the
    value as JSON. The header's checksum catches an entry cut short or edited by hand, which a
    JSON parse alone would take for a shorter (wrong) value.
    """

    def __init__(self, name: str, generation: str | None, max_entries: int | None = None):
        """``generation`` None: no caching (the caller cannot tell what its entries depend on).
        ``max_entries``: the most entries the generation keeps (see module doc); None, no bound."""
        root = cache_root()
        self.folder = root / name / generation if root is not None and generation else None
        self.writable = self.folder is not None
        self.max_entries = max_entries

    def get(self, key: str):
        """The value stored under ``key``, or None for a miss (absent, unreadable, damaged)."""
        if self.folder is None:
            return None
        if self.folder not in _swept:
            _swept.add(self.folder)
            _remove_stale_temporaries(self.folder)
        path = self.folder / f"{key}.json"
        try:
            header, _, payload = path.read_bytes().partition(b"\n")
            meta = json.loads(header)
            if meta != {
                "format": FORMAT,
                "key": key,
                "sha256": hashlib.sha256(payload).hexdigest(),
            }:
                return None
            value = json.loads(payload)
        except (OSError, ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
            return None
        if self.max_entries is not None:  # used now: the last to go when the bound is reached
            with contextlib.suppress(OSError):  # a read-only folder, or deleted meanwhile
                os.utime(path)
        return value

    def put(self, key: str, value) -> None:
        """Store ``value`` under ``key``; a folder that cannot be written turns writing off for
        this cache object (one failed attempt, not one per entry)."""
        if not self.writable:
            return
        payload = json.dumps(value, separators=(",", ":")).encode("ascii")  # lone surrogates too
        meta = {"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest()}
        temp = None
        try:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                _prune(self.folder)
            fd, temp = tempfile.mkstemp(dir=self.folder, prefix=TEMPORARY, suffix=".json")
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(meta).encode("utf-8") + b"\n" + payload)
            os.replace(temp, self.folder / f"{key}.json")
            temp = None
            if self.max_entries is not None:
                _evict(self.folder, self.max_entries)
        except OSError:
            self.writable = False
        finally:  # not renamed into place: a failed write, or one interrupted (KeyboardInterrupt)
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)


def _remove_stale_temporaries(generation: Path) -> None:
    """Delete the temporary files in ``generation`` that writers killed between writing an entry
    and renaming it into place left behind (each as large as its entry, up to megabytes), those
    unchanged for `STALE_SECONDS`. Once per process and generation, at its first lookup: one
    listing, not one per entry read (a file is statted only where its name is a temporary's).

    Told by age, not by a pid in the name: a pid says nothing of a process on another machine
    sharing the folder (a home folder over NFS), or in another container, and may have been
    reused. The age is measured by this machine's clock against the file server's times, which
    may differ (by seconds where NTP runs), far less than the hour allowed. A live writer's file is seconds old at most;
    one removed from a writer stopped (Ctrl-Z) for longer only loses that writer its entry: its
    rename fails, and it goes on without the cache (`JsonCache.put`)."""
    try:
        names = [name for name in os.listdir(generation) if name.startswith(TEMPORARY)]
    except OSError:  # no such folder yet, or one that cannot be read
        return
    before = time.time() - STALE_SECONDS
    for name in names:
        with contextlib.suppress(OSError):  # renamed or removed meanwhile; a read-only folder
            if os.stat(generation / name).st_mtime < before:
                os.unlink(generation / name)


def _evict(folder: Path, kept: int) -> None:
    """Delete all but the ``kept`` most recently used entries of ``folder`` (a generation). Each
    is statted only once the folder holds more; one deleted meanwhile (by another process's
    eviction) is passed over, and one being read by another process is read whole or missed."""
    names = [n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
    if len(names) <= kept:
        return
    used = []
    for name in names:
        try:
            used.append((os.stat(folder / name).st_mtime_ns, name))
        except OSError:
            continue
    for _, name in sorted(used, reverse=True)[kept:]:
        (folder / name).unlink(missing_ok=True)


def _prune(generation: Path) -> None:
    """Delete all but the `KEPT_GENERATIONS` most recently changed generations beside (and
    counting) ``generation``, just made. A folder another process still writes to only loses
    that process's later entries (its writes fail and it computes, as without a cache)."""

    def changed(folder: Path) -> float:
        try:
            return folder.stat().st_mtime
        except OSError:  # deleted meanwhile by another process's pruning
            return 0.0

    others = [p for p in generation.parent.iterdir() if p.is_dir() and p != generation]
    for old in sorted(others, key=changed, reverse=True)[KEPT_GENERATIONS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
