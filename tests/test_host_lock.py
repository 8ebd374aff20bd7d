"""The host timing lock (harness.measurement.host_lock): readings run alone, waiting work never starves a
reading, a killed holder frees it. Threads with their own lock objects stand for workers (flock locks
belong to the open file, so two objects in one process exclude each other as two processes do)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from harness.measurement.host_lock import HostTimingLock


def _section(lock: HostTimingLock, kind: str, name: str, log: list, hold_s: float, entered=None):
    with getattr(lock, kind)():
        log.append(f"{name}+")
        if entered is not None:
            entered.set()
        time.sleep(hold_s)
        log.append(f"{name}-")


def test_a_reading_waits_for_work_in_flight_and_new_work_waits_for_the_reading(tmp_path):
    path = tmp_path / "timing.lock"
    log: list[str] = []
    held = threading.Event()
    work = threading.Thread(target=_section, args=(HostTimingLock(path), "working", "w1", log, 0.6, held))
    work.start()
    held.wait(5)
    reading = threading.Thread(target=_section, args=(HostTimingLock(path), "timing", "t", log, 0.3))
    reading.start()
    time.sleep(0.2)  # the reading now waits, holding the gate
    late = threading.Thread(target=_section, args=(HostTimingLock(path), "working", "w2", log, 0.0))
    late.start()
    for t in (work, reading, late):
        t.join(10)
    assert log == ["w1+", "w1-", "t+", "t-", "w2+", "w2-"]


def test_work_runs_beside_work(tmp_path):
    path = tmp_path / "timing.lock"
    log: list[str] = []
    a_in = threading.Event()
    a = threading.Thread(target=_section, args=(HostTimingLock(path), "working", "a", log, 0.5, a_in))
    a.start()
    a_in.wait(5)
    b = threading.Thread(target=_section, args=(HostTimingLock(path), "working", "b", log, 0.0))
    b.start()
    for t in (a, b):
        t.join(10)
    assert log == ["a+", "b+", "b-", "a-"]  # shared: b did not wait for a


def test_a_holder_killed_with_sigkill_frees_the_lock(tmp_path):
    path = tmp_path / "timing.lock"
    code = (
        "import sys, time\n"
        "from harness.measurement.host_lock import HostTimingLock\n"
        f"lock = HostTimingLock({str(path)!r})\n"
        "with lock.working():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        log: list[str] = []
        reading = threading.Thread(target=_section, args=(HostTimingLock(path), "timing", "t", log, 0.0))
        reading.start()
        reading.join(0.5)
        assert log == []  # the live holder keeps the reading out
        holder.kill()
        reading.join(10)
        assert log == ["t+", "t-"]
    finally:
        holder.kill()
        holder.wait()


def test_nesting_in_one_process(tmp_path):
    lock = HostTimingLock(tmp_path / "timing.lock")
    with lock.timing():
        with lock.working():  # the reading's own forwards: no second turn
            pass
        with lock.timing():
            pass
    with lock.working(), pytest.raises(RuntimeError, match="wait for itself"), lock.timing():
        pass


def test_off_disables(tmp_path, monkeypatch):
    monkeypatch.setenv("SNED_TIMING_LOCK", "off")
    lock = HostTimingLock()
    assert not lock.enabled
    with lock.working(), lock.timing():
        pass
