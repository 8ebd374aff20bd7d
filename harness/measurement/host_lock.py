"""Workers of one host take turns with the cores: a latency reading runs alone.

Several search workers on one machine (one study in PostgreSQL, or several studies) would time each
other's video generation into every latency reading, and the reading's other-process check then refuses
them all. :class:`HostTimingLock` is a writer-preferring reader-writer lock on two files (``flock``, so a
worker killed with SIGKILL releases it with its process): heavy work (generating and scoring videos,
counting FLOPs) holds it *shared*, a latency reading holds it *exclusively*. A reading waits for the work
in flight to finish (one measurement group at most) and no new work starts meanwhile: the gate file is
taken exclusively by whoever wants in and held by the reader only while it takes its turn, so a waiting
reading is never starved by workers that keep starting new work.

The lock lives in the system's temporary directory, one per host (``SNED_TIMING_LOCK`` names another
path, ``off`` disables it). Where ``fcntl`` is missing (Windows) it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

ENV = "SNED_TIMING_LOCK"
DEFAULT_PATH = Path(tempfile.gettempdir()) / "sned-harness-timing.lock"


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):  # another user's file: it stays as they made it
        os.fchmod(fd, 0o666)  # every user's workers on this host share the turns
    return fd


class HostTimingLock:
    """``timing()``: exclusive, for a latency reading; ``working()``: shared, for other heavy work.
    Re-entrant per kind within one process (a nested section of the same kind is a no-op); a ``timing()``
    inside ``working()`` in one process would wait for itself and raises ``RuntimeError`` instead."""

    def __init__(self, path: str | os.PathLike | None = None):
        chosen = path if path is not None else os.environ.get(ENV, str(DEFAULT_PATH))
        self.enabled = fcntl is not None and str(chosen).lower() != "off"
        self.path = Path(chosen)
        self._fds: tuple[int, int] | None = None
        self._held: str | None = None

    def _files(self) -> tuple[int, int]:
        if self._fds is None:
            gate = self.path.with_name(self.path.name + ".gate")
            self._fds = (_open(gate), _open(self.path))
        return self._fds

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        if not self.enabled or self._held == "timing":
            yield
            return
        if self._held == "working":
            raise RuntimeError(
                "a latency reading inside heavy work of the same process would wait for itself"
            )
        gate, main = self._files()
        fcntl.flock(gate, fcntl.LOCK_EX)  # no new work starts from here on
        try:
            fcntl.flock(main, fcntl.LOCK_EX)  # work in flight finishes
            self._held = "timing"
            try:
                yield
            finally:
                self._held = None
                fcntl.flock(main, fcntl.LOCK_UN)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        if not self.enabled or self._held is not None:
            yield  # nested work, or work a reading does itself (its own forwards are what it times)
            return
        gate, main = self._files()
        fcntl.flock(gate, fcntl.LOCK_EX)  # wait behind any reading that is waiting or running
        try:
            fcntl.flock(main, fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        self._held = "working"
        try:
            yield
        finally:
            self._held = None
            fcntl.flock(main, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


_LOCK: HostTimingLock | None = None


def host_timing_lock() -> HostTimingLock:
    """This process's lock (one per process: flock locks belong to the open file)."""
    global _LOCK
    if _LOCK is None:
        _LOCK = HostTimingLock()
    return _LOCK
