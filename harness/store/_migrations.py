"""Schema versions of the store and the migration path between them.

Each migration is a function of an open ``Connection`` inside the upgrade transaction. Migrations are
*frozen*: they describe the schema as it was at their version (with SQLAlchemy Core, not the ORM models,
which always describe the latest schema), so a version-1 database upgrades the same way forever.
To change the schema, append a migration and update ``_models.py`` to match; never edit an old one.

Contract of :func:`upgrade`: it applies every missing migration in order, in one transaction, and
records the new version; it is safe to call from several processes at once (PostgreSQL: transaction
advisory lock; SQLite: ``BEGIN IMMEDIATE`` from the store's engine, see ``store.py``). A database whose
version is newer than the code knows raises :class:`StoreError` and is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection

from .urls import StoreError

VERSION_TABLE = "sned_schema_version"
# Arbitrary constant key of the PostgreSQL advisory lock serialising concurrent upgrades.
_PG_ADVISORY_LOCK_KEY = 0x5E4D0001


@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply`` brings a database at ``version - 1`` to ``version``."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_tables(metadata: MetaData) -> None:
    """Frozen version-1 schema: version, supernet, candidate, measurement, trial link, claim."""
    Table(VERSION_TABLE, metadata, Column("version", Integer, primary_key=True, autoincrement=False))
    Table(
        "sned_supernet", metadata,
        Column("id", Integer, primary_key=True),
        Column("checkpoint_sha256", String(64), nullable=False, unique=True),
        Column("family", String(128), nullable=False),
        Column("preset", String(128), nullable=False),
        Column("metadata", Text, nullable=False),
        Column("created_at", DateTime, nullable=False),
    )  # fmt: skip
    Table(
        "sned_candidate", metadata,
        Column("id", Integer, primary_key=True),
        Column("supernet_id", Integer, ForeignKey("sned_supernet.id"), nullable=False, index=True),
        Column("key", String(64), nullable=False),
        Column("config_json", Text, nullable=False),
        Column("resolution", Integer, nullable=False),
        Column("params", BigInteger, nullable=False),
        Column("description", Text, nullable=False),
        UniqueConstraint("supernet_id", "key", name="uq_sned_candidate_supernet_key"),
    )  # fmt: skip
    Table(
        "sned_measurement", metadata,
        Column("id", Integer, primary_key=True),
        Column("candidate_id", Integer, ForeignKey("sned_candidate.id"), nullable=False, index=True),
        Column("metric", String(64), nullable=False),
        Column("value", Float, nullable=True),
        Column("std", Float, nullable=True),
        Column("unit", String(32), nullable=False),
        Column("protocol", String(255), nullable=False),
        Column("extractor", String(255), nullable=True),
        Column("device", String(255), nullable=False),
        Column("torch_version", String(64), nullable=False),
        Column("seed", Integer, nullable=True),
        Column("status", String(16), nullable=False),
        Column("error", Text, nullable=True),
        Column("extra", Text, nullable=False),
        Column("created_at", DateTime, nullable=False),
        UniqueConstraint("candidate_id", "metric", "protocol", "device", name="uq_sned_measurement"),
        CheckConstraint("status IN ('ok', 'failed')", name="ck_sned_measurement_status"),
    )  # fmt: skip
    Table(
        "sned_trial_link", metadata,
        Column("id", Integer, primary_key=True),
        Column("candidate_id", Integer, ForeignKey("sned_candidate.id"), nullable=False, index=True),
        Column("study_name", String(512), nullable=False),
        Column("optuna_trial_id", Integer, nullable=True),
        Column("trial_number", Integer, nullable=True),
        Column("searcher", String(128), nullable=False),
        Column("created_at", DateTime, nullable=False),
        UniqueConstraint("candidate_id", "study_name", "trial_number", name="uq_sned_trial_link"),
    )  # fmt: skip
    Table(
        "sned_claim", metadata,
        Column("id", Integer, primary_key=True),
        Column("candidate_id", Integer, ForeignKey("sned_candidate.id"), nullable=False, index=True),
        Column("metric_group", String(64), nullable=False),
        Column("protocol", String(255), nullable=False),
        Column("device", String(255), nullable=False),
        Column("worker", String(255), nullable=False),
        Column("status", String(16), nullable=False),
        Column("claimed_at", DateTime, nullable=False),
        UniqueConstraint("candidate_id", "metric_group", "protocol", "device", name="uq_sned_claim"),
        CheckConstraint("status IN ('running', 'done')", name="ck_sned_claim_status"),
    )  # fmt: skip


def _migrate_v1(connection: Connection) -> None:
    """Version 1: create the store's tables."""
    metadata = MetaData()
    _v1_tables(metadata)
    metadata.create_all(connection)


def _migrate_v2(connection: Connection) -> None:
    """Version 2: ``sned_measurement.wall_s`` (seconds a measurement took), index on (metric, protocol)."""
    connection.execute(text("ALTER TABLE sned_measurement ADD COLUMN wall_s FLOAT"))
    connection.execute(
        text("CREATE INDEX ix_sned_measurement_metric_protocol ON sned_measurement (metric, protocol)")
    )


# The columns migration 3 copies (sned_measurement as of version 2, sned_claim as of version 1).
_V2_MEASUREMENT_COLUMNS = (
    "id", "candidate_id", "metric", "value", "std", "unit", "protocol", "extractor", "device",
    "torch_version", "seed", "status", "error", "extra", "created_at", "wall_s",
)  # fmt: skip
_V1_CLAIM_COLUMNS = ("id", "candidate_id", "metric_group", "protocol", "device", "worker", "status",
                     "claimed_at")  # fmt: skip


def _v3_sqlite_tables(metadata: MetaData, suffix: str) -> tuple[Table, Table]:
    """Frozen version-3 measurement and claim tables, named ``<table><suffix>`` (indexes made by hand:
    their names must be those of the final table, not of the temporary one)."""
    measurement = Table(
        f"sned_measurement{suffix}", metadata,
        Column("id", Integer, primary_key=True),
        Column("candidate_id", Integer, ForeignKey("sned_candidate.id"), nullable=False),
        Column("metric", String(64), nullable=False),
        Column("value", Float, nullable=True),
        Column("std", Float, nullable=True),
        Column("unit", String(32), nullable=False),
        Column("protocol", String(255), nullable=False),
        Column("extractor", String(255), nullable=True),
        Column("device", String(255), nullable=False),
        Column("torch_version", String(64), nullable=False),
        Column("seed", Integer, nullable=True),
        Column("status", String(16), nullable=False),
        Column("error", Text, nullable=True),
        Column("extra", Text, nullable=False),
        Column("created_at", DateTime, nullable=False),
        Column("wall_s", Float, nullable=True),
        Column("cache_key", String(64), nullable=False, server_default=""),
        Column("identity", Text, nullable=False, server_default="{}"),
        UniqueConstraint("candidate_id", "metric", "protocol", "device", "cache_key",
                         name="uq_sned_measurement"),
        CheckConstraint("status IN ('ok', 'failed')", name="ck_sned_measurement_status"),
    )  # fmt: skip
    claim = Table(
        f"sned_claim{suffix}", metadata,
        Column("id", Integer, primary_key=True),
        Column("candidate_id", Integer, ForeignKey("sned_candidate.id"), nullable=False),
        Column("metric_group", String(64), nullable=False),
        Column("protocol", String(255), nullable=False),
        Column("device", String(255), nullable=False),
        Column("worker", String(255), nullable=False),
        Column("status", String(16), nullable=False),
        Column("claimed_at", DateTime, nullable=False),
        Column("cache_key", String(64), nullable=False, server_default=""),
        UniqueConstraint("candidate_id", "metric_group", "protocol", "device", "cache_key",
                         name="uq_sned_claim"),
        CheckConstraint("status IN ('running', 'done')", name="ck_sned_claim_status"),
    )  # fmt: skip
    return measurement, claim


def _migrate_v3(connection: Connection) -> None:
    """Version 3: cache keys. ``sned_measurement.cache_key`` / ``identity`` and ``sned_claim.cache_key``,
    part of both unique keys: the hash (and, JSON, the parts) of what produced a value beyond its protocol
    and device (torch, the metric's implementation version, extractor weights, ...). Existing rows get
    ``cache_key = ''``, which no measurement of this code looks up: what produced them is unknown, so
    they stay readable for analysis but are never reused (nor are their finished claims)."""
    if connection.dialect.name == "postgresql":
        for table, constraint, columns in (
            ("sned_measurement", "uq_sned_measurement", "candidate_id, metric, protocol, device"),
            ("sned_claim", "uq_sned_claim", "candidate_id, metric_group, protocol, device"),
        ):
            connection.execute(
                text(f"ALTER TABLE {table} ADD COLUMN cache_key VARCHAR(64) NOT NULL DEFAULT ''")
            )
            connection.execute(text(f"ALTER TABLE {table} DROP CONSTRAINT {constraint}"))
            connection.execute(
                text(f"ALTER TABLE {table} ADD CONSTRAINT {constraint} UNIQUE ({columns}, cache_key)")
            )
        connection.execute(
            text("ALTER TABLE sned_measurement ADD COLUMN identity TEXT NOT NULL DEFAULT '{}'")
        )
        return
    # SQLite cannot change a table's unique constraint: rebuild both tables (copy, drop, rename).
    metadata = MetaData()
    Table("sned_candidate", metadata, Column("id", Integer, primary_key=True))  # referenced, not created
    for table in _v3_sqlite_tables(metadata, "_v3"):
        table.create(connection)
    for name, columns in (("sned_measurement", _V2_MEASUREMENT_COLUMNS), ("sned_claim", _V1_CLAIM_COLUMNS)):
        listed = ", ".join(columns)
        connection.execute(text(f"INSERT INTO {name}_v3 ({listed}) SELECT {listed} FROM {name}"))
        connection.execute(text(f"DROP TABLE {name}"))
        connection.execute(text(f"ALTER TABLE {name}_v3 RENAME TO {name}"))
    connection.execute(
        text("CREATE INDEX ix_sned_measurement_candidate_id ON sned_measurement (candidate_id)")
    )
    connection.execute(
        text("CREATE INDEX ix_sned_measurement_metric_protocol ON sned_measurement (metric, protocol)")
    )
    connection.execute(text("CREATE INDEX ix_sned_claim_candidate_id ON sned_claim (candidate_id)"))


def _migrate_v4(connection: Connection) -> None:
    """Version 4: ``sned_trial_link.setting``, the measurement setting (device, extractor, protocols) a
    trial was told from, so that a study's analysis reads only its own setting's rows. Existing links get
    ``'{}'`` (setting unknown: every setting, as before)."""
    connection.execute(text("ALTER TABLE sned_trial_link ADD COLUMN setting TEXT NOT NULL DEFAULT '{}'"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create the sned_ tables", _migrate_v1),
    Migration(2, "measurement.wall_s and index on (metric, protocol)", _migrate_v2),
    Migration(
        3, "cache keys: measurement.cache_key/identity, claim.cache_key, in the unique keys", _migrate_v3
    ),
    Migration(4, "trial_link.setting: the measurement setting a trial was told from", _migrate_v4),
)
SCHEMA_VERSION: int = MIGRATIONS[-1].version
"""Latest schema version this code knows (derived from ``MIGRATIONS``, never edited by hand)."""


def current_version(connection: Connection) -> int:
    """Schema version recorded in the database; 0 when the store's tables were never created."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return 0
    version = connection.execute(text(f"SELECT MAX(version) FROM {VERSION_TABLE}")).scalar()
    return int(version or 0)


def check_not_newer(version: int) -> None:
    """Raise :class:`StoreError` when the database was written by newer code than this."""
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is newer than this code supports ({SCHEMA_VERSION}); "
            "upgrade the sned-harness package"
        )


def _record_version(connection: Connection, version: int) -> None:
    connection.execute(text(f"DELETE FROM {VERSION_TABLE}"))
    connection.execute(text(f"INSERT INTO {VERSION_TABLE} (version) VALUES (:v)"), {"v": version})


def upgrade(engine: Engine, target: int | None = None) -> int:
    """Apply the missing migrations up to ``target`` (default: latest) in one transaction.

    Returns the version the database is at afterwards. Never downgrades: a database already at or
    beyond ``target`` is left as is (beyond the latest known version raises :class:`StoreError`).
    Safe against concurrent callers in other processes (they serialise; the later ones find no work).
    """
    target = SCHEMA_VERSION if target is None else target
    if not 0 < target <= SCHEMA_VERSION:
        raise StoreError(f"migration target {target} outside 1..{SCHEMA_VERSION}")
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_ADVISORY_LOCK_KEY})
        version = current_version(connection)
        check_not_newer(version)
        pending = [m for m in MIGRATIONS if version < m.version <= target]
        for migration in pending:
            migration.apply(connection)
        if pending:
            _record_version(connection, pending[-1].version)
            version = pending[-1].version
    return version
