"""A per-thread on/off switch with a context manager that turns it on (and restores it)."""

from __future__ import annotations

import contextlib
import threading


class ThreadFlag:
    """False until `on()` is entered in this thread; nested and exception-safe."""

    def __init__(self):
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def on(self):
        previous = bool(self)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous
