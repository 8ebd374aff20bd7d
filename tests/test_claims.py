"""Claims and atomic groups: a holder keeps its claim alive while it measures (a long FVD is never
measured twice), a dead holder's claim is taken over, and a group's rows plus the claim's end are written
in one transaction (a failure half-way leaves none)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from harness.candidates import Candidate
from harness.measurement.recorder import (
    Computed,
    MeasurementFailed,
    MetricGroup,
    Recorder,
    cache_key,
    full_identity,
)
from harness.store import Store, StoreError

SHA, KEY = "c" * 64, "d" * 64


class Slow(MetricGroup):
    """FVD and KVD that take ``seconds`` to compute, counting the computations (thread-safe)."""

    metrics, device = ("fvd", "kvd"), "cpu-test"
    versions: ClassVar[Mapping[str, int]] = {"fvd": 1, "kvd": 1}

    def __init__(self, seconds: float, fail: bool = False) -> None:
        self.seconds, self.fail = seconds, fail
        self.calls = 0
        self._lock = threading.Lock()

    def protocol(self, cand: Candidate) -> str:
        return "fvd8_12f_16px@proxy-v1"

    def compute(self, cand: Candidate) -> Computed:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("extractor exploded")
        return {"fvd": 10.0, "fvd_std": 1.0, "kvd": 0.5, "kvd_std": 0.1}, {"extractor": "proxy-v1"}


@pytest.fixture(scope="module")
def cand() -> Candidate:
    from search_spaces import build_supernet

    return Candidate(build_supernet("pixel-base", "tiny").space.smallest())


def _open(path: Path) -> tuple[Store, int, int]:
    store = Store.open(path)
    supernet = store.get_or_create_supernet(SHA, "pixel-base", "tiny")
    return store, supernet.id, store.get_or_create_candidate(supernet.id, KEY, {"i": 1}, 16, 10).id


def test_long_measurement_keeps_its_claim(tmp_path: Path, cand: Candidate) -> None:
    """The holder computes for 3x the stale timeout; a second worker waits and reads its result instead
    of taking the claim over (without the heartbeat it would compute a second time)."""
    timeout = 0.6
    store_a, supernet_id, cid = _open(tmp_path / "s.db")
    store_b = Store(tmp_path / "s.db")
    group = Slow(seconds=3 * timeout)
    a = Recorder(store_a, supernet_id, "worker-a", seed=0, claim_timeout_s=timeout)
    b = Recorder(store_b, supernet_id, "worker-b", seed=0, claim_timeout_s=timeout)
    results: dict[str, dict] = {}
    first = threading.Thread(target=lambda: results.setdefault("a", a.measure_group(cid, group, cand)))
    first.start()
    while group.calls == 0:  # worker-a holds the claim and computes
        time.sleep(0.01)
    results["b"] = b.measure_group(cid, group, cand)
    first.join()
    assert group.calls == 1
    assert results["a"] == results["b"] and (a.measured, b.cache_hits) == (1, 1)
    store_a.close()
    store_b.close()


def test_dead_holders_claim_is_taken_over(tmp_path: Path, cand: Candidate) -> None:
    store, supernet_id, cid = _open(tmp_path / "s.db")
    group = Slow(seconds=0.0)
    key = cache_key(full_identity(group.identity(cand)))
    assert store.claim(cid, "fvd+kvd", group.protocol(cand), group.device, "killed", cache_key=key)
    recorder = Recorder(store, supernet_id, "alive", seed=0, claim_timeout_s=0.3)
    assert recorder.measure_group(cid, group, cand)["fvd"] == 10.0 and group.calls == 1  # no beats: stale
    store.close()


def _fail_inserts_of(path: Path, metric: str) -> None:
    """A real database refusal of every write of ``metric``'s row (as a full disk or a kill would stop
    the second write): an SQLite trigger."""
    with sqlite3.connect(path) as connection:
        for event in ("INSERT", "UPDATE"):
            connection.execute(
                f"CREATE TRIGGER refuse_{metric}_{event.lower()} BEFORE {event} ON sned_measurement "
                f"WHEN NEW.metric = '{metric}' BEGIN SELECT RAISE(ABORT, 'refused {metric}'); END"
            )


@pytest.mark.parametrize("fail", [False, True], ids=["values", "failure"])
def test_group_is_recorded_in_one_transaction(tmp_path: Path, cand: Candidate, fail: bool) -> None:
    """The group's second row cannot be written: neither is its first, and the claim is free again."""
    store, supernet_id, cid = _open(tmp_path / "s.db")
    _fail_inserts_of(tmp_path / "s.db", "kvd")
    group = Slow(seconds=0.0, fail=fail)
    recorder = Recorder(store, supernet_id, "w1", seed=0, claim_timeout_s=60.0)
    with pytest.raises(Exception, match="refused kvd") as error:
        recorder.measure_group(cid, group, cand)
    assert not isinstance(error.value, MeasurementFailed)  # the database's error, not the candidate's
    assert store.measurements_frame(superseded=True).empty
    key = cache_key(full_identity(group.identity(cand)))
    assert store.claim(cid, "fvd+kvd", group.protocol(cand), group.device, "w2", cache_key=key)
    store.close()


def test_atomic_block_rolls_back_every_call(tmp_path: Path) -> None:
    store, _, cid = _open(tmp_path / "s.db")
    where = {"protocol": "p", "device": "d"}
    with pytest.raises(StoreError, match="record_failure"), store.atomic():
        store.record_measurement(cid, "fvd", 1.0, **where)
        assert store.claim(cid, "fvd+kvd", "p", "d", "w1")
        store.record_measurement(cid, "kvd", None, **where)  # type: ignore[arg-type]
    assert store.find_measurement(cid, "fvd", "p", "d") is None
    assert store.claim(cid, "fvd+kvd", "p", "d", "w2")  # the claim was rolled back too
    with store.atomic(), store.atomic():  # nested: one transaction, committed at the end
        store.record_measurement(cid, "fvd", 1.0, **where)
    assert store.find_measurement(cid, "fvd", "p", "d").value == 1.0
    store.close()
