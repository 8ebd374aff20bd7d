"""All ORM models of the store, in one module (the pattern of optuna's ``storages/_rdb/models.py``),
with the row-level helpers every writer and reader shares (``insert_ignore``, ``frame_record``).

The tables are prefixed ``sned_`` so that they sit beside Optuna's own tables (``studies``, ``trials``,
``alembic_version``, ...) in the same database: one URL serves both ``Store`` and Optuna's
``RDBStorage``, and ``optuna-dashboard <url>`` still opens the studies.

These classes describe the *latest* schema. The database is created and upgraded only by the frozen
migrations in :mod:`harness.store._migrations`; ``tests/test_store.py`` checks that the two agree.

Conventions:
    * timestamps are naive UTC ``datetime`` values (PostgreSQL server clock for claims, see ``Store``);
    * JSON payloads (``metadata``, ``config_json``, ``extra``) are stored as text written with
      ``json.dumps(..., sort_keys=True)`` so they compare byte for byte.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

MEASUREMENT_STATUSES = ("ok", "failed")
CLAIM_STATUSES = ("running", "done")


def utcnow() -> dt.datetime:
    """Current time as a naive UTC datetime (the store's timestamp convention)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of the store's tables (Optuna's tables live in Optuna's own metadata)."""


class SchemaVersionModel(Base):
    """One row holding the schema version the database was migrated to."""

    __tablename__ = "sned_schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class SupernetModel(Base):
    """A trained weight-sharing supernet, identified by the SHA-256 of its checkpoint file."""

    __tablename__ = "sned_supernet"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    family: Mapped[str] = mapped_column(String(128))
    preset: Mapped[str] = mapped_column(String(128))
    # Column named "metadata" (the attribute name is reserved by the declarative base).
    metadata_json: Mapped[str] = mapped_column("metadata", Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class CandidateModel(Base):
    """A subnet configuration of one supernet; ``key`` is the config's stable content hash."""

    __tablename__ = "sned_candidate"
    __table_args__ = (UniqueConstraint("supernet_id", "key", name="uq_sned_candidate_supernet_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    supernet_id: Mapped[int] = mapped_column(ForeignKey("sned_supernet.id"), index=True)
    key: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    resolution: Mapped[int] = mapped_column(Integer)
    params: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="")


class MeasurementModel(Base):
    """One measured figure of one candidate under one protocol on one device.

    Unique on ``(candidate_id, metric, protocol, device, cache_key)``: the same candidate under the same
    protocol on the same device, produced by the same code and inputs (``cache_key``: a hash of
    ``identity``, see ``harness.measurement.recorder``), is measured once. ``status`` is ``'ok'``
    (``value`` set) or ``'failed'`` (``error`` set, ``value`` usually ``None``). ``extra`` is JSON
    provenance (threads, dtype, batch, frames, ...).
    """

    __tablename__ = "sned_measurement"
    __table_args__ = (
        # Migration 3 added cache_key to the key.
        UniqueConstraint(
            "candidate_id", "metric", "protocol", "device", "cache_key", name="uq_sned_measurement"
        ),
        CheckConstraint("status IN ('ok', 'failed')", name="ck_sned_measurement_status"),
        # Added by migration 2: analyses filter on (metric, protocol).
        Index("ix_sned_measurement_metric_protocol", "metric", "protocol"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("sned_candidate.id"), index=True)
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    std: Mapped[float | None] = mapped_column(Float, nullable=True)
    unit: Mapped[str] = mapped_column(String(32), default="")
    protocol: Mapped[str] = mapped_column(String(255))
    extractor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    device: Mapped[str] = mapped_column(String(255))
    torch_version: Mapped[str] = mapped_column(String(64), default="")
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    extra: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Added by migration 2: wall-clock seconds the measurement took (None when unknown).
    wall_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Added by migration 3: SHA-256 of ``identity`` ('' for rows from before, never reused), and the
    # identity itself as JSON (torch version, metric implementation versions, extractor weights, ...).
    cache_key: Mapped[str] = mapped_column(String(64), default="", server_default="")
    identity: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")


class TrialLinkModel(Base):
    """Links a measured candidate to an Optuna trial (own searchers' or imported via ``add_trial``).

    Unique on ``(candidate_id, study_name, trial_number)``; links without a trial number are not
    deduplicated (SQL treats NULLs as distinct).
    """

    __tablename__ = "sned_trial_link"
    __table_args__ = (
        UniqueConstraint("candidate_id", "study_name", "trial_number", name="uq_sned_trial_link"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("sned_candidate.id"), index=True)
    study_name: Mapped[str] = mapped_column(String(512))
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    searcher: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Added by migration 4: the measurement setting the trial was told from, as JSON (``device``,
    # ``extractor``, ``protocols``: metric -> protocol); '{}' for links from before (any setting).
    setting: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")


class ClaimModel(Base):
    """A worker's claim on measuring one metric group of one candidate (see ``Store.claim``).

    Unique on ``(candidate_id, metric_group, protocol, device, cache_key)``. ``status`` is ``'running'``
    while the holder measures (``claimed_at`` refreshed by re-claiming) and ``'done'`` once finished.
    """

    __tablename__ = "sned_claim"
    __table_args__ = (
        # Migration 3 added cache_key to the key.
        UniqueConstraint(
            "candidate_id", "metric_group", "protocol", "device", "cache_key", name="uq_sned_claim"
        ),
        CheckConstraint("status IN ('running', 'done')", name="ck_sned_claim_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("sned_candidate.id"), index=True)
    metric_group: Mapped[str] = mapped_column(String(64))
    protocol: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(255))
    worker: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="running")
    claimed_at: Mapped[dt.datetime] = mapped_column()
    # Added by migration 3: the cache key of the measurement claimed ('' for claims from before).
    cache_key: Mapped[str] = mapped_column(String(64), default="", server_default="")


def insert_ignore(
    session: Session, model: type[Base], values: Mapping[str, Any], keys: Sequence[str]
) -> bool:
    """``INSERT .. ON CONFLICT (keys) DO NOTHING`` (atomic on SQLite and PostgreSQL); True if inserted."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(model.__table__).values(**values).on_conflict_do_nothing(index_elements=list(keys))
    return session.connection().execute(statement).rowcount == 1


FRAME_COLUMNS = (
    "measurement_id", "candidate_id", "candidate_key", "supernet_id", "checkpoint_sha256", "family",
    "preset", "resolution", "params", "description", "config", "metric", "value", "std", "unit",
    "protocol", "extractor", "device", "torch_version", "seed", "status", "error", "wall_s", "extra",
    "created_at", "cache_key", "identity", "study_names", "trial_numbers", "searchers", "link_settings",
)  # fmt: skip


def frame_record(
    m: MeasurementModel, c: CandidateModel, s: SupernetModel, links: list[TrialLinkModel]
) -> dict[str, Any]:
    """One ``Store.measurements_frame`` row (keys ``FRAME_COLUMNS``)."""
    return {
        "measurement_id": m.id, "candidate_id": c.id, "candidate_key": c.key, "supernet_id": s.id,
        "checkpoint_sha256": s.checkpoint_sha256, "family": s.family, "preset": s.preset,
        "resolution": c.resolution, "params": c.params, "description": c.description,
        "config": json.loads(c.config_json), "metric": m.metric, "value": m.value, "std": m.std,
        "unit": m.unit, "protocol": m.protocol, "extractor": m.extractor, "device": m.device,
        "torch_version": m.torch_version, "seed": m.seed, "status": m.status, "error": m.error,
        "wall_s": m.wall_s, "extra": json.loads(m.extra), "created_at": m.created_at,
        "cache_key": m.cache_key, "identity": json.loads(m.identity or "{}"),
        "study_names": [link.study_name for link in links],
        "trial_numbers": [link.trial_number for link in links],
        "searchers": [link.searcher for link in links],
        "link_settings": [json.loads(link.setting or "{}") for link in links],
    }  # fmt: skip
