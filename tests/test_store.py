"""The SQL store on SQLite: schema and migrations, cache, idempotent records, claims, frame, URLs, Optuna."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from pathlib import Path

import optuna
import pytest
from sqlalchemy import inspect

from harness.store import (
    SCHEMA_VERSION,
    Store,
    StoreError,
    _migrations,
    optuna_storage,
    redact_url,
    validate_storage_url,
)
from harness.store._models import FRAME_COLUMNS, Base
from harness.store.urls import create_store_engine, ensure_parent_directory

SHA = "a" * 64
KEY = "b" * 64
MEASURE = {"protocol": "latency:forward:bs1", "device": "cpu-test"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return str(tmp_path / "runs" / "store.db")


@pytest.fixture
def store(url: str) -> Store:
    with Store.open(url) as opened:
        yield opened


@pytest.fixture
def candidate_id(store: Store) -> int:
    supernet = store.get_or_create_supernet(SHA, "dit3d", "tiny", {"steps": 10})
    return store.get_or_create_candidate(supernet.id, KEY, {"depth": 2, "width": 64}, 32, 1234, "d2w64").id


def _db_version(path: str) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT version FROM sned_schema_version").fetchone()[0]


# Schema and migrations.


def test_open_creates_latest_schema_matching_models(store: Store, url: str) -> None:
    assert store.schema_version() == SCHEMA_VERSION == _migrations.MIGRATIONS[-1].version
    assert store.url == f"sqlite:///{url}"
    inspector = inspect(create_store_engine(store.url))
    for table in Base.metadata.sorted_tables:
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        assert columns == set(table.columns.keys()), table.name
    indexes = {index["name"] for index in inspector.get_indexes("sned_measurement")}
    assert "ix_sned_measurement_metric_protocol" in indexes
    with sqlite3.connect(url) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_without_open_requires_an_existing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="Store.open"):
        Store(tmp_path / "missing" / "store.db")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "garbage.db").write_bytes(b"not a sqlite database, " * 100)
    with pytest.raises(StoreError, match="cannot open store .*garbage.db: file is not a database"):
        Store.open(tmp_path / "garbage.db")


def test_upgrade_from_version_1_keeps_rows(url: str) -> None:
    # Build a version-1 database by running only the first migration, and write rows at v1.
    ensure_parent_directory(validate_storage_url(url))
    engine = create_store_engine(validate_storage_url(url))
    assert _migrations.upgrade(engine, target=1) == 1
    engine.dispose()
    with sqlite3.connect(url) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(sned_measurement)")}
        assert "wall_s" not in columns
        connection.execute(
            "INSERT INTO sned_supernet VALUES (1, ?, 'dit3d', 'tiny', '{}', '2026-01-01 00:00:00')", (SHA,)
        )
        connection.execute("INSERT INTO sned_candidate VALUES (1, 1, ?, '{}', 32, 10, '')", (KEY,))
        connection.execute(
            "INSERT INTO sned_measurement VALUES (1, 1, 'flops', 5.0, NULL, 'FLOP', 'fvcore', NULL, "
            "'cpu', '2.3', NULL, 'ok', NULL, '{}', '2026-01-01 00:00:00')"
        )
    with pytest.raises(StoreError, match="older"):
        Store(url)

    with Store.open(url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        frame = store.measurements_frame()
    assert _db_version(url) == SCHEMA_VERSION
    assert frame[["metric", "value", "family"]].values.tolist() == [["flops", 5.0, "dit3d"]]
    assert frame["wall_s"].isna().all()


def test_newer_schema_version_is_a_one_line_error(store: Store, url: str) -> None:
    store.close()
    with sqlite3.connect(url) as connection:
        connection.execute("UPDATE sned_schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    for opener in (Store, Store.open):
        with pytest.raises(StoreError) as error:
            opener(url)
        message = str(error.value)
        assert "\n" not in message
        assert str(SCHEMA_VERSION + 5) in message and str(SCHEMA_VERSION) in message
    assert _db_version(url) == SCHEMA_VERSION + 5


def test_session_rolls_back_on_error(store: Store, candidate_id: int) -> None:
    from harness.store._models import TrialLinkModel

    with pytest.raises(RuntimeError), store.session() as session:
        session.add(TrialLinkModel(candidate_id=candidate_id, study_name="s", searcher="tpe"))
        session.flush()
        raise RuntimeError("abort")
    with store.session() as session:
        assert session.query(TrialLinkModel).count() == 0


# Supernets, candidates, measurements.


def test_get_or_create_is_idempotent_and_checks_conflicts(store: Store, candidate_id: int) -> None:
    supernet = store.get_or_create_supernet(SHA, "dit3d", "tiny")
    again = store.get_or_create_candidate(supernet.id, KEY, json.dumps({"width": 64, "depth": 2}), 32, 1234)
    assert again.id == candidate_id
    with pytest.raises(StoreError, match="different config"):
        store.get_or_create_candidate(supernet.id, KEY, {"depth": 3}, 32, 1234)
    with pytest.raises(StoreError, match="stored as dit3d/tiny"):
        store.get_or_create_supernet(SHA, "unet3d", "tiny")


def test_cache_lookup(store: Store, candidate_id: int) -> None:
    assert store.find_measurement(candidate_id, "latency_ms", **MEASURE) is None
    row = store.record_measurement(candidate_id, "latency_ms", 12.5, std=0.5, unit="ms", **MEASURE)
    found = store.find_measurement(candidate_id, "latency_ms", **MEASURE)
    assert found is not None and found.id == row.id and (found.value, found.std) == (12.5, 0.5)
    assert store.find_measurement(candidate_id, "latency_ms", "latency:forward:bs2", "cpu-test") is None
    assert store.find_measurement(candidate_id, "latency_ms", MEASURE["protocol"], "cuda:0") is None


def test_record_is_idempotent(store: Store, candidate_id: int) -> None:
    first = store.record_measurement(candidate_id, "latency_ms", 12.5, unit="ms", seed=3, **MEASURE)
    second = store.record_measurement(candidate_id, "latency_ms", 99.0, unit="ms", **MEASURE)
    assert second.id == first.id and second.value == 12.5 and second.seed == 3
    assert len(store.measurements_frame()) == 1


def test_failed_measurement_is_recorded_and_retried(store: Store, candidate_id: int) -> None:
    failed = store.record_failure(candidate_id, "fvd", "CUDA out of memory", extractor="i3d", **MEASURE)
    assert (failed.status, failed.value, failed.error) == ("failed", None, "CUDA out of memory")
    cached = store.find_measurement(candidate_id, "fvd", **MEASURE)
    assert cached is not None and cached.status == "failed"
    retried = store.record_measurement(candidate_id, "fvd", 321.0, extractor="i3d", wall_s=4.0, **MEASURE)
    assert retried.id == failed.id and (retried.status, retried.value, retried.error) == ("ok", 321.0, None)
    assert retried.wall_s == 4.0
    kept = store.record_failure(candidate_id, "fvd", "late failure", **MEASURE)
    assert (kept.status, kept.value) == ("ok", 321.0)
    with pytest.raises(StoreError, match="record_failure"):
        store.record_measurement(candidate_id, "kvd", None, **MEASURE)  # type: ignore[arg-type]


def test_measurements_frame_contents(store: Store, candidate_id: int) -> None:
    assert list(store.measurements_frame().columns) == list(FRAME_COLUMNS)
    assert store.measurements_frame().empty
    store.record_measurement(
        candidate_id, "latency_ms", 12.5, unit="ms", torch_version="2.3.1", extra={"threads": 4}, **MEASURE
    )
    store.record_failure(candidate_id, "fvd", "boom", protocol="fvd64_12f@proxy-v1", device="cpu-test")
    store.link_trial(candidate_id, "study-a", "tpe", optuna_trial_id=7, trial_number=0)
    store.link_trial(candidate_id, "study-a", "tpe", optuna_trial_id=7, trial_number=0)  # idempotent
    store.link_trial(candidate_id, "study-a", "evolution", trial_number=1)

    frame = store.measurements_frame()
    assert list(frame.columns) == list(FRAME_COLUMNS) and len(frame) == 2
    latency, fvd = frame.iloc[0], frame.iloc[1]
    assert (latency.metric, latency.value, latency.unit, latency.status) == ("latency_ms", 12.5, "ms", "ok")
    assert (latency.family, latency.preset, latency.checkpoint_sha256) == ("dit3d", "tiny", SHA)
    assert (latency.candidate_key, latency.resolution, latency.params) == (KEY, 32, 1234)
    assert latency.config == {"depth": 2, "width": 64} and latency.extra == {"threads": 4}
    assert latency.torch_version == "2.3.1"
    assert (fvd.status, fvd.error, fvd.protocol) == ("failed", "boom", "fvd64_12f@proxy-v1")
    assert latency.study_names == ["study-a", "study-a"] and latency.trial_numbers == [0, 1]
    assert latency.searchers == ["tpe", "evolution"]


# Claims.


def test_claim_contract(store: Store, candidate_id: int) -> None:
    group = (candidate_id, "latency", MEASURE["protocol"], MEASURE["device"])
    assert store.claim(*group, "worker-a")
    assert not store.claim(*group, "worker-b")
    assert store.claim(*group, "worker-a")  # re-claim by the holder is a heartbeat
    assert not store.release_claim(*group, "worker-b")
    assert store.release_claim(*group, "worker-a")
    assert store.claim(*group, "worker-b")  # released: free again
    assert store.claim(*group, "worker-c", stale_after_s=0.0)  # stale: taken over
    assert not store.finish_claim(*group, "worker-b")  # worker-b lost it
    assert store.finish_claim(*group, "worker-c")
    assert not store.claim(*group, "worker-a", stale_after_s=0.0)  # done: never again


# URLs.


@pytest.mark.parametrize(
    ("raw", "redacted"),
    [
        ("postgresql://sned:s3cret@db.lan:5432/search", "postgresql://sned:***@db.lan:5432/search"),
        (
            "postgresql+psycopg2://u:p@ss@h/db?sslmode=require",
            "postgresql+psycopg2://u:***@h/db?sslmode=require",
        ),
        ("postgresql://u@h/db?password=s3cret&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////tmp/store.db", "sqlite:////tmp/store.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(raw: str, redacted: str) -> None:
    assert redact_url(raw) == redacted


def test_validate_storage_url_normalises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path}/sub/store.db"
    assert validate_storage_url("sub/store.db") == expected
    assert validate_storage_url(Path("sub/store.db")) == expected
    assert validate_storage_url("sqlite:///sub/store.db") == expected
    assert validate_storage_url(f"sqlite:///{tmp_path}/sub/store.db") == expected
    pg = "postgresql+psycopg2://u:p@h:5433/db?sslmode=require"
    for raw in (pg, pg.replace("+psycopg2", ""), pg.replace("postgresql+psycopg2", "postgres")):
        assert validate_storage_url(raw) == pg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "mysql://u:s3cret@h/db",
        "postgresql+asyncpg://u:s3cret@h/db",
        "postgresql://u:s3cret@h",
        "sqlite://",
        "sqlite:///:memory:",
        "://nothing",
    ],
)
def test_validate_storage_url_rejects_malformed(raw: str) -> None:
    with pytest.raises(StoreError) as error:
        validate_storage_url(raw)
    message = str(error.value)
    assert "\n" not in message and "accepted" in message and "s3cret" not in message
    assert isinstance(error.value, ValueError)


def test_unwritable_sqlite_path_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(tmp_path / "a_file" / "sub" / "store.db")
    with pytest.raises(StoreError, match="not a directory"):
        optuna_storage(tmp_path / "a_file" / "store.db")

    # A read-only directory (simulated: the tests may run as root, which os.access never refuses).
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(StoreError, match="not writable"):
        Store.open(locked / "deeper" / "store.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "locked"]
    assert list(locked.iterdir()) == []


# Optuna beside the store.


@pytest.mark.parametrize("optuna_first", [True, False])
def test_optuna_tables_coexist(url: str, optuna_first: bool) -> None:
    def create_study() -> optuna.Study:
        study = optuna.create_study(study_name="s", storage=optuna_storage(url), directions=["minimize"] * 2)
        study.add_trial(
            optuna.trial.create_trial(
                params={"depth": 2},
                distributions={"depth": optuna.distributions.IntDistribution(1, 4)},
                values=[1.0, 2.0],
            )
        )
        return study

    study = create_study() if optuna_first else None
    store = Store.open(url)
    study = study or create_study()
    supernet = store.get_or_create_supernet(SHA, "dit3d", "tiny")
    candidate = store.get_or_create_candidate(supernet.id, KEY, {"depth": 2}, 32, 10)
    trial = study.trials[0]
    store.link_trial(
        candidate.id, "s", "evolution", optuna_trial_id=trial._trial_id, trial_number=trial.number
    )
    store.close()

    # What optuna-dashboard does: a plain RDBStorage on the URL sees the study; the store reopens.
    plain = optuna.storages.RDBStorage(validate_storage_url(url))
    assert [summary.study_name for summary in optuna.get_all_study_summaries(plain)] == ["s"]
    assert optuna.load_study(study_name="s", storage=plain).trials[0].values == [1.0, 2.0]
    with Store(url) as reopened:
        assert reopened.measurements_frame().empty
        assert (
            reopened.link_trial(candidate.id, "s", "evolution", trial_number=0).optuna_trial_id
            == trial._trial_id
        )


def test_store_pickles_as_its_url(store: Store, candidate_id: int) -> None:
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url and repr(clone) == repr(store)
    assert clone.get_or_create_supernet(SHA, "dit3d", "tiny").id == 1
    clone.close()
