"""The SQL store on a real PostgreSQL server, shared by concurrent worker processes.

Each test gets a fresh database ``sned_test_<random>`` (created on the ``test`` database, dropped after).
Skipped, with the reason, only when the server at 127.0.0.1:5432 is unreachable.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from harness.store import SCHEMA_VERSION, Store, optuna_storage, validate_storage_url

pytestmark = pytest.mark.postgres

SERVER = "postgresql://postgres@127.0.0.1:5432"
N_WORKERS = 4
N_CANDIDATES = 30
PROTOCOL = "latency:forward:bs1"
DEVICE = "cpu-test"


def _admin_connection() -> Any:
    import psycopg2

    try:
        connection = psycopg2.connect(f"{SERVER}/test", connect_timeout=3)
    except psycopg2.OperationalError as error:
        pytest.skip(f"PostgreSQL at {SERVER} is unreachable: {str(error).strip().splitlines()[0]}")
    connection.autocommit = True
    return connection


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"sned_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"{SERVER}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _candidate_key(index: int) -> str:
    return f"{index:064x}"


def _worker(url: str, worker: str, seed: int, barrier: Any, results: Any) -> None:
    """One search worker: open the store, then for every candidate (own order) record and claim-measure."""
    try:
        barrier.wait()  # Race the schema creation too.
        store = Store.open(url)
        supernet = store.get_or_create_supernet("f" * 64, "dit3d", "tiny", {"worker": worker})
        order = list(range(N_CANDIDATES))
        random.Random(seed).shuffle(order)
        barrier.wait()
        measured, params_rows = [], {}
        for index in order:
            key = _candidate_key(index)
            candidate = store.get_or_create_candidate(supernet.id, key, {"i": index}, 32, 100 + index)
            # Every worker records the same figure: exactly one row survives, everyone gets it.
            row = store.record_measurement(
                candidate.id, "params", float(seed), protocol="count", device="any"
            )
            params_rows[key] = (row.id, row.value)
            # Cache, then claim: exactly one worker measures each candidate.
            if store.find_measurement(candidate.id, "latency_ms", PROTOCOL, DEVICE) is not None:
                continue
            if not store.claim(candidate.id, "latency", PROTOCOL, DEVICE, worker):
                continue
            time.sleep(0.01)  # The "measurement" (long enough for the others to race it).
            store.record_measurement(candidate.id, "latency_ms", index + 0.5, unit="ms", protocol=PROTOCOL,
                                     device=DEVICE, extra={"worker": worker})  # fmt: skip
            assert store.finish_claim(candidate.id, "latency", PROTOCOL, DEVICE, worker)
            measured.append(key)
        store.close()
        results.put({"worker": worker, "measured": measured, "params_rows": params_rows})
    except BaseException:
        results.put({"worker": worker, "error": traceback.format_exc()})
        raise


def test_concurrent_workers_measure_each_candidate_once(pg_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(N_WORKERS), context.Queue()
    processes = [
        context.Process(target=_worker, args=(pg_url, f"w{i}", i, barrier, results)) for i in range(N_WORKERS)
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    assert [r["error"] for r in reports if "error" in r] == []
    measured = Counter(key for r in reports for key in r["measured"])
    assert len(measured) == N_CANDIDATES and set(measured.values()) == {1}
    for key in measured:  # All workers got the single surviving 'params' row.
        assert len({r["params_rows"][key] for r in reports}) == 1

    with Store(pg_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        frame = store.measurements_frame()
        with store.session() as session:
            claims = session.execute(text("SELECT status, count(*) FROM sned_claim GROUP BY status")).all()
    assert len(frame) == 2 * N_CANDIDATES
    assert frame.groupby("metric")["candidate_id"].nunique().to_dict() == {
        "latency_ms": N_CANDIDATES,
        "params": N_CANDIDATES,
    }
    assert not frame.duplicated(["candidate_id", "metric", "protocol", "device"]).any()
    assert (frame["status"] == "ok").all() and frame["supernet_id"].nunique() == 1
    latency = frame[frame.metric == "latency_ms"]
    assert sorted(latency["value"]) == [i + 0.5 for i in range(N_CANDIDATES)]
    assert dict(claims) == {"done": N_CANDIDATES}


def test_stale_claim_takeover_uses_server_clock(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        supernet = store.get_or_create_supernet("e" * 64, "dit3d", "tiny")
        candidate = store.get_or_create_candidate(supernet.id, _candidate_key(1), {"i": 1}, 32, 10)
        group = (candidate.id, "quality", "fvd64_12f@proxy-v1", DEVICE)
        assert store.claim(*group, "killed-worker")
        assert not store.claim(*group, "w1", stale_after_s=60.0)
        time.sleep(0.05)
        assert store.claim(*group, "w1", stale_after_s=0.01)
        assert not store.finish_claim(*group, "killed-worker")
        store.record_failure(candidate.id, "fvd", "extractor missing", protocol=group[2], device=DEVICE)
        assert store.find_measurement(candidate.id, "fvd", group[2], DEVICE).status == "failed"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_optuna_and_store_share_the_database(pg_url: str) -> None:
    import optuna

    study = optuna.create_study(study_name="shared", storage=optuna_storage(pg_url, heartbeat_interval=60))
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=2)
    with Store.open(pg_url) as store:
        supernet = store.get_or_create_supernet("d" * 64, "dit3d", "tiny")
        candidate = store.get_or_create_candidate(supernet.id, _candidate_key(2), {"i": 2}, 32, 10)
        link = store.link_trial(candidate.id, "shared", "tpe", optuna_trial_id=study.trials[1]._trial_id,
                                trial_number=1)  # fmt: skip
        assert link.trial_number == 1
    # What optuna-dashboard does with the normalised URL.
    assert len(optuna.load_study(study_name="shared", storage=validate_storage_url(pg_url)).trials) == 2
