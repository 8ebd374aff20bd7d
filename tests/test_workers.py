"""Search workers under real conditions: one killed with SIGKILL in the middle of a measurement on a
shared PostgreSQL study, two processes on one SQLite study, a bug inside a trial."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from harness.store import Store, optuna_storage
from tests.test_search import ENV, FAST, REPO, search


def start_worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.search", *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_running_claim(url: str, pid: int, timeout_s: float = 600) -> tuple[int, str]:
    """``(candidate_id, metric group)`` of the first claim worker ``pid`` holds while measuring
    FVD/KVD (the long measurement); polls the store's claims table."""
    engine = sqlalchemy.create_engine(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as c:
                rows = c.execute(
                    sqlalchemy.text(
                        "SELECT candidate_id, metric_group, worker FROM sned_claim WHERE status = 'running'"
                    )
                ).all()
            for cid, group, worker in rows:
                if worker.endswith(f":{pid}") and "fvd" in group:
                    return cid, group
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise AssertionError(f"worker {pid} never started an FVD measurement")


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_killed_mid_measurement_is_replaced_by_the_others(postgres_url):
    """Three workers, one killed with SIGKILL while it measures an FVD and not restarted: the other two
    finish the study with exactly the requested complete trials, the dead worker's trial is failed and
    its candidate measured by one of them, and no measurement group is done twice."""
    args = ["--objective", "latency", "--trials", "6", "--storage", postgres_url, "--study", "killed",
            "--stale-after", "12", *FAST]  # fmt: skip
    Store.open(postgres_url).close()
    workers = [start_worker(*args) for _ in range(3)]
    victim = workers[0]
    try:
        cid, group = wait_for_running_claim(postgres_url, victim.pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        taken = {}
        for w in workers[1:]:
            out, err = w.communicate(timeout=900)
            assert w.returncode == 0, err[-2000:]
            taken[w.pid] = int(out.split(f":{w.pid}: ")[1].split(" measurement groups taken")[0])
    finally:
        for w in workers:
            w.kill()
    study = optuna.load_study(study_name="killed", storage=optuna_storage(postgres_url))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6
    with Store(postgres_url).session() as s:
        key = s.execute(sqlalchemy.text("SELECT key FROM sned_candidate WHERE id = :i"), {"i": cid}).scalar()
    dead = [t for t in trials if t.user_attrs.get("candidate_key") == key and t.state == TrialState.FAIL]
    assert len(dead) == 1 and not dead[0].user_attrs.get("measurement_failed")
    retried = [t for t in complete if t.user_attrs.get("requeued_from") == dead[0].number]
    assert len(retried) == 1 and retried[0].user_attrs["candidate_key"] == key
    frame = Store(postgres_url).measurements_frame()
    ok = frame[frame.status == "ok"]
    # Measurement work, not rows: every group a live worker measured (its own count) is a finished claim
    # in its name, so none was measured twice; the dead worker's group was taken over after going stale.
    with Store(postgres_url).session() as s:
        claims = s.execute(
            sqlalchemy.text("SELECT candidate_id, metric_group, worker, status FROM sned_claim")
        ).all()
    for pid, n in taken.items():  # what each live worker measured, each finished under its own name
        assert n == sum(c.status == "done" and c.worker.endswith(f":{pid}") for c in claims), pid
    taken_over = [c for c in claims if c.candidate_id == cid and c.metric_group == group]
    assert len(taken_over) == 1 and taken_over[0].status == "done"
    assert not taken_over[0].worker.endswith(f":{victim.pid}"), "the dead worker's claim was never taken over"
    fvd = ok[ok.metric == "fvd"]
    assert set(fvd.candidate_key) == {t.user_attrs["candidate_key"] for t in complete}
    assert fvd.groupby(["candidate_id", "protocol"]).size().max() == 1


@pytest.mark.slow
def test_a_second_process_on_one_sqlite_study_stops_in_one_line(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    args = ["--objective", "latency", "--trials", "3", "--storage", url, "--study", "one", *FAST]
    first = start_worker(*args)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the first process is searching once it asked a trial
            try:
                trials = optuna.load_study(study_name="one", storage=optuna_storage(url)).get_trials()
            except KeyError:
                trials = []
            if any(t.state == TrialState.RUNNING for t in trials):
                break
            time.sleep(0.2)
        second = search(*args, check=False)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert "another process is searching study 'one'" in lines[-1] and "Traceback" not in second.stderr
        _out, err = first.communicate(timeout=900)
        assert first.returncode == 0, err[-2000:]  # the second process failed none of its trials
    finally:
        first.kill()
    trials = optuna.load_study(study_name="one", storage=optuna_storage(url)).get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    # A trial given back when a reading was put off (the second process's start kept the cores busy) is
    # FAIL without an error; one failed as abandoned by a dead worker, or by a measurement, carries one.
    assert not [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
