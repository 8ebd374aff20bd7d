"""The database the migrations build is the schema the ORM models describe: column types, nullability,
primary and foreign keys, unique constraints, indexes and check constraints, not only column names.

The store creates and upgrades its tables only through the frozen migrations
(``harness.store._migrations``), while the code reads and writes through the models
(``harness.store._models``); a migration that declares ``VARCHAR(32)`` where the model says
``String(64)``, or forgets a ``NOT NULL`` or an index, would pass a check of names alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import (
    CheckConstraint,
    Engine,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    inspect,
)

from harness.store import Store
from harness.store._models import Base
from harness.store.urls import create_store_engine

# Spellings the database reports for the type the model compiles to: PostgreSQL stores SQLAlchemy's
# FLOAT (no precision) as double precision and reflects it so.
SYNONYMS = {"postgresql": {"FLOAT": "DOUBLE PRECISION"}}


def _type_name(type_, dialect) -> str:
    name = type_.compile(dialect=dialect).upper()
    return SYNONYMS.get(dialect.name, {}).get(name, name)


def _columns(table: Table, live: dict[str, dict], dialect) -> list[str]:
    out = []
    if set(live) != set(table.columns.keys()):
        out.append(f"{table.name}: columns {sorted(live)}, model {sorted(table.columns.keys())}")
    for column in table.columns:
        got = live.get(column.name)
        if got is None:
            continue
        where = f"{table.name}.{column.name}"
        got_type, want_type = _type_name(got["type"], dialect), _type_name(column.type, dialect)
        if got_type != want_type:
            out.append(f"{where}: type {got_type}, model {want_type}")
        if bool(got["nullable"]) != bool(column.nullable):
            out.append(f"{where}: nullable {got['nullable']}, model {column.nullable}")
        # The models keep defaults on the Python side; a server default would be a migration's own idea
        # (autoincrementing keys excepted: PostgreSQL reports their sequence as the default).
        if not column.primary_key and (got.get("default") is None) != (column.server_default is None):
            out.append(f"{where}: server default {got.get('default')!r}, model {column.server_default!r}")
    return out


def _keys(table: Table, inspector) -> list[str]:
    out = []
    pk = inspector.get_pk_constraint(table.name)["constrained_columns"]
    if sorted(pk) != sorted(c.name for c in table.primary_key.columns):
        out.append(f"{table.name}: primary key {pk}, model {[c.name for c in table.primary_key.columns]}")
    live_fks = {
        (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
        for fk in inspector.get_foreign_keys(table.name)
    }
    model_fks = {
        (tuple(c.name for c in fk.columns), fk.referred_table.name, tuple(e.column.name for e in fk.elements))
        for fk in table.foreign_key_constraints
    }
    if live_fks != model_fks:
        out.append(f"{table.name}: foreign keys {sorted(live_fks)}, model {sorted(model_fks)}")
    return out


def _uniques_and_indexes(table: Table, inspector, dialect) -> list[str]:
    out = []
    live_uniques = {
        tuple(sorted(u["column_names"])): u["name"] for u in inspector.get_unique_constraints(table.name)
    }
    model_uniques = {
        tuple(sorted(c.name for c in u.columns)): u.name
        for u in table.constraints
        if isinstance(u, UniqueConstraint)
    }
    if set(live_uniques) != set(model_uniques):
        out.append(f"{table.name}: unique on {sorted(live_uniques)}, model {sorted(model_uniques)}")
    for columns, name in model_uniques.items():  # a name the model gives is a name code may rely on
        if isinstance(name, str) and columns in live_uniques and live_uniques[columns] != name:
            out.append(f"{table.name}: unique {columns} named {live_uniques[columns]!r}, model {name!r}")
    # PostgreSQL lists the index behind each unique constraint too; those are the constraints above.
    live_indexes = {
        (i["name"], tuple(i["column_names"]), bool(i["unique"]))
        for i in inspector.get_indexes(table.name)
        if "duplicates_constraint" not in i
    }
    model_indexes = {(i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes}
    if live_indexes != model_indexes:
        out.append(f"{table.name}: indexes {sorted(live_indexes)}, model {sorted(model_indexes)}")
    live_checks = {c["name"]: c["sqltext"] for c in inspector.get_check_constraints(table.name)}
    model_checks = {c.name: str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)}
    if set(live_checks) != set(model_checks):
        out.append(f"{table.name}: checks {sorted(live_checks)}, model {sorted(model_checks)}")
    elif dialect.name == "sqlite":  # SQLite keeps the text as written (PostgreSQL rewrites it)
        for name, text in model_checks.items():
            if " ".join(live_checks[name].split()) != " ".join(text.split()):
                out.append(f"{table.name}: check {name} is {live_checks[name]!r}, model {text!r}")
    return out


def schema_differences(engine: Engine, metadata: MetaData) -> list[str]:
    """Every way the live database behind ``engine`` differs from ``metadata`` (empty: they agree)."""
    inspector = inspect(engine)
    live_tables = set(inspector.get_table_names())
    out = []
    for table in metadata.sorted_tables:
        if table.name not in live_tables:
            out.append(f"{table.name}: missing")
            continue
        live = {c["name"]: c for c in inspector.get_columns(table.name)}
        out += _columns(table, live, engine.dialect)
        out += _keys(table, inspector)
        out += _uniques_and_indexes(table, inspector, engine.dialect)
    return out


def _migrated(url: str) -> Engine:
    with Store.open(url) as store:
        store_url = store.url
    return create_store_engine(store_url)


def test_sqlite_store_schema_matches_the_models(tmp_path: Path) -> None:
    engine = _migrated(str(tmp_path / "store.db"))
    try:
        assert schema_differences(engine, Base.metadata) == []
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_store_schema_matches_the_models(postgres_url: str) -> None:
    engine = _migrated(postgres_url)
    try:
        assert schema_differences(engine, Base.metadata) == []
    finally:
        engine.dispose()


def test_the_comparison_sees_what_a_check_of_names_misses(tmp_path: Path) -> None:
    # A database with the models' tables and column names but a shorter type, a lost NOT NULL, a lost
    # index and a lost unique constraint: the names-only check passes, this one names all four.
    drifted = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    measurement, claim = drifted.tables["sned_measurement"], drifted.tables["sned_claim"]
    measurement.c.status.type = String(8)
    measurement.c.metric.nullable = True
    measurement.indexes.discard(next(i for i in measurement.indexes if i.name.endswith("_metric_protocol")))
    claim.constraints.discard(next(c for c in claim.constraints if c.name == "uq_sned_claim"))
    engine = create_engine(f"sqlite:///{tmp_path / 'drifted.db'}")
    try:
        drifted.create_all(engine)
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())
        differences = schema_differences(engine, Base.metadata)
    finally:
        engine.dispose()
    assert len(differences) == 4, differences
    assert any("sned_measurement.status: type VARCHAR(8), model VARCHAR(16)" in d for d in differences)
    assert any("sned_measurement.metric: nullable True, model False" in d for d in differences)
    assert any("sned_measurement: indexes" in d for d in differences)
    assert any("sned_claim: unique on" in d for d in differences)
