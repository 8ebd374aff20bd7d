"""Storage URLs beyond the basics of test_store.py: psycopg 3 beside psycopg2 (on the real PostgreSQL
server), and opening a store read-only without ever creating one (a mistyped ``--storage``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, inspect

from harness.store import Store, StoreError, optuna_storage, validate_storage_url

# psycopg 3.


def test_psycopg3_urls_are_accepted_and_bare_urls_keep_psycopg2() -> None:
    pg3 = "postgresql+psycopg://u:p@h:5433/db?sslmode=require"
    assert validate_storage_url(pg3) == pg3
    assert validate_storage_url(pg3.replace("+psycopg", "+psycopg2")) == pg3.replace("+psycopg", "+psycopg2")
    assert validate_storage_url(pg3.replace("+psycopg", "")).startswith("postgresql+psycopg2://")


@pytest.fixture
def psycopg3_url(postgres_url: str) -> str:
    import psycopg  # noqa: F401  (a dependency: missing, the test fails rather than skips)

    return postgres_url.replace("postgresql+psycopg2://", "postgresql+psycopg://", 1)


@pytest.mark.postgres
def test_store_and_optuna_run_on_psycopg3(psycopg3_url: str) -> None:
    with Store.open(psycopg3_url) as store:
        assert store._engine.dialect.driver == "psycopg"  # really psycopg 3, not a silent psycopg2
        supernet = store.get_or_create_supernet("a" * 64, "pixel-base", "tiny")
        candidate = store.get_or_create_candidate(supernet.id, "b" * 64, {"x": 1}, 16, 10)
        first = store.record_measurement(candidate.id, "params", 10.0, protocol="count", device="any")
        again = store.record_measurement(candidate.id, "params", 11.0, protocol="count", device="any")
        assert again.id == first.id and again.value == 10.0  # ON CONFLICT DO NOTHING on this driver too
        assert store.claim(candidate.id, "latency", "p", "cpu", "w1")
        assert not store.claim(candidate.id, "latency", "p", "cpu", "w2")
        with store.exclusive("optuna-schema"):  # the advisory lock
            storage = optuna_storage(psycopg3_url)
    assert storage.engine.dialect.driver == "psycopg"
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize"])
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    # The same database through psycopg2: both drivers see one store.
    psycopg2_url = psycopg3_url.replace("+psycopg://", "+psycopg2://", 1)
    assert len(optuna.load_study(study_name="s", storage=optuna_storage(psycopg2_url)).trials) == 2
    assert len(Store(psycopg2_url).measurements_frame()) == 1


# Read-only opening: a mistyped --storage creates nothing.


def _one_line_naming(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "--storage" in message, message
    for needle in needles:
        assert needle in message, message


def test_open_existing_refuses_a_missing_file_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "missing" / "harnes.db"
    with pytest.raises(StoreError) as error:
        Store.open_existing(typo)
    _one_line_naming(error, str(typo), "does not exist")
    with pytest.raises(StoreError) as error:
        optuna_storage(typo, create=False)
    _one_line_naming(error, str(typo))
    assert list(tmp_path.iterdir()) == []


def test_open_existing_refuses_foreign_files(tmp_path: Path) -> None:
    other = tmp_path / "other.db"  # a SQLite database, but not a store
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database at all\n" * 100)
    before = {p.name: p.read_bytes() for p in (other, text_file)}
    with pytest.raises(StoreError) as error:
        Store.open_existing(other)
    _one_line_naming(error, "no store tables", str(other))
    with pytest.raises(StoreError) as error:
        optuna_storage(other, create=False)
    _one_line_naming(error, "no Optuna studies")
    with pytest.raises(StoreError) as error:
        Store.open_existing(text_file)
    _one_line_naming(error, "cannot open store")
    assert {p.name: p.read_bytes() for p in (other, text_file)} == before
    assert not inspect(create_engine(f"sqlite:///{other}")).has_table("studies")


def test_open_existing_reads_a_store_and_optuna_create_false_adds_no_tables(tmp_path: Path) -> None:
    url = validate_storage_url(tmp_path / "h.db")
    with Store.open(url) as store:
        store.get_or_create_supernet("c" * 64, "pixel-base", "tiny")
    with Store.open_existing(url) as store:
        assert store.schema_version() >= 1
    # The store without a study yet: a read-only command refuses instead of creating Optuna's tables.
    with pytest.raises(StoreError, match="no Optuna studies"):
        optuna_storage(url, create=False)
    assert not inspect(create_engine(url)).has_table("studies")
    optuna.create_study(study_name="s", storage=optuna_storage(url))
    assert optuna_storage(url, create=False).get_study_id_from_name("s") is not None


@pytest.mark.postgres
def test_open_existing_on_an_empty_postgres_database_names_the_redacted_url(postgres_url: str) -> None:
    with_password = postgres_url.replace("postgres@", "postgres:s3cret@", 1)  # trust auth ignores it
    for opener in (Store.open_existing, lambda u: optuna_storage(u, create=False)):
        with pytest.raises(StoreError) as error:
            opener(with_password)
        _one_line_naming(error, "postgres:***@")
        assert "s3cret" not in str(error.value)
    assert not inspect(create_engine(postgres_url)).get_table_names()  # nothing created
