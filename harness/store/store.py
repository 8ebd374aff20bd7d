"""The measurement store: one SQL database (SQLite file or PostgreSQL) shared by every searcher.

Contract (the parts a caller relies on):
    * **Processes and threads.** A ``Store`` owns a SQLAlchemy engine (a connection pool): share one per
      process between threads, create one per process (a ``Store`` pickles as its URL, so passing it to a
      spawned worker opens a fresh one there). Every public method runs in its own transaction.
    * **Concurrency.** On PostgreSQL any number of processes on any number of machines may write at once:
      ``get_or_create_*``, ``record_*``, ``link_trial`` and ``claim`` are atomic under the tables' unique
      constraints (``INSERT .. ON CONFLICT DO NOTHING`` then re-select), so a race never duplicates a row
      or raises; the loser gets the winner's row. SQLite serialises writers (``BEGIN IMMEDIATE``, WAL,
      30 s busy timeout): fine for one machine and a few processes, never for a distributed search.
    * **The cache.** ``find_measurement(candidate, metric, protocol, device, cache_key)`` returns the
      stored row or ``None``. ``cache_key`` names what produced a value beyond its protocol and device
      (``harness.measurement.recorder.cache_key``); rows from before schema version 3 have ``''``. An
      ``'ok'`` row is final; a ``'failed'`` row may be replaced by a later attempt.
    * **Claims.** See :meth:`Store.claim`.
    * **Atomic groups.** Calls made on one thread inside ``with store.atomic():`` share one transaction:
      all of their writes are committed together at the end, or none (an error, a killed process).
    * Returned rows are detached snapshots: reading attributes is free, assigning them writes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import _migrations
from ._models import (
    FRAME_COLUMNS,
    CandidateModel,
    ClaimModel,
    MeasurementModel,
    SupernetModel,
    TrialLinkModel,
    frame_record,
    insert_ignore,
    utcnow,
)
from .urls import (
    EXISTING_STORE_FIX,
    StoreError,
    create_store_engine,
    ensure_parent_directory,
    redact_url,
    require_existing_database,
    require_table,
    sqlite_path,
    validate_storage_url,
)

if TYPE_CHECKING:
    import pandas as pd
    from typing_extensions import Self

DEFAULT_STALE_AFTER_S = 3600.0  # seconds after which a 'running' claim may be taken over


def _json_text(payload: Mapping[str, Any] | str | None) -> str:
    """Canonical JSON text (sorted keys) of a mapping; a string is parsed and re-dumped."""
    if payload is None:
        return "{}"
    data = json.loads(payload) if isinstance(payload, str) else dict(payload)
    return json.dumps(data, sort_keys=True, default=str)


@functools.cache
def _installed_torch_version() -> str:
    """Version of the installed torch distribution, read without importing torch."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _db_now(session: Session) -> dt.datetime:
    """Naive UTC "now" from the database server on PostgreSQL (one clock for all machines), else local."""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(text("SELECT timezone('UTC', clock_timestamp())")).scalar_one()
    return utcnow()


def _check_key(name: str, value: str) -> None:
    if not value or len(value) > 64:
        raise StoreError(f"{name} must be a non-empty string of at most 64 characters, got {value!r}")


class Store:
    """Measurements of candidate subnets, with their supernets, Optuna trial links and claims.

    ``Store(url)`` opens an existing store at the latest schema version and never changes the schema;
    ``Store.open(url)`` creates or upgrades it first. Either raises a one-line :class:`StoreError` when
    the database cannot be reached or read, or its schema version does not fit. See the module docstring for the concurrency
    contract.
    """

    def __init__(
        self, url: str | os.PathLike[str], *, upgrade: bool = False, _fix: str | None = None
    ) -> None:
        # _fix: the remedy a missing store's message names (open_existing: the CLI's --storage).
        self._local = threading.local()  # .session: this thread's open atomic() block, if any
        self._url = validate_storage_url(url)
        path = sqlite_path(self._url)
        if upgrade:
            ensure_parent_directory(self._url)
        elif _fix is not None:  # read-only: look before the store's engine (it would switch SQLite to WAL)
            require_existing_database(self._url)
            require_table(self._url, _migrations.VERSION_TABLE, "no store tables")
        elif path is not None and not path.exists():
            raise StoreError(f"no store at {path}; create it with Store.open(url)")
        self._engine = create_store_engine(self._url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            if upgrade:
                _migrations.upgrade(self._engine)
            self._check_version(_fix)
        except DBAPIError as error:
            self._engine.dispose()
            reason = (str(error.orig).strip() or type(error.orig).__name__).splitlines()[0]
            tail = f"; {_fix}" if _fix else ""
            raise StoreError(f"cannot open store {self.redacted_url}: {reason}{tail}") from error
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def open(cls, url: str | os.PathLike[str]) -> Store:
        """Open the store at ``url``, creating its tables or applying missing migrations first."""
        return cls(url, upgrade=True)

    @classmethod
    def open_existing(cls, url: str | os.PathLike[str]) -> Store:
        """Open the store at ``url`` for a read-only command (plot, export, analysis), creating nothing.

        A missing SQLite file, a database without the harness's tables or one that is not a database
        raises a one-line :class:`StoreError` naming the (redacted) URL and the fix (check ``--storage``),
        so that a mistyped ``--storage`` fails instead of leaving an empty database behind.
        """
        return cls(url, _fix=EXISTING_STORE_FIX)

    # Lifecycle.

    @property
    def url(self) -> str:
        """The normalised URL, password included: pass it on, never print it (use ``redacted_url``)."""
        return self._url

    @property
    def redacted_url(self) -> str:
        """The URL with its password hidden, for logs and reports."""
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"Store({self.redacted_url!r})"

    def __reduce__(self) -> tuple[type[Store], tuple[str]]:
        return (type(self), (self._url,))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (the store may still be used; it reconnects on demand)."""
        self._engine.dispose()

    def schema_version(self) -> int:
        """Schema version recorded in the database."""
        with self._engine.connect() as connection:
            return _migrations.current_version(connection)

    def _check_version(self, fix: str | None = None) -> None:
        version = self.schema_version()
        _migrations.check_not_newer(version)
        if version == 0:
            raise StoreError(
                f"no store tables at {self.redacted_url}; {fix or 'create them with Store.open(url)'}"
            )
        if version < _migrations.SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is older than this code's ({_migrations.SCHEMA_VERSION}); "
                "upgrade it with Store.open(url)"
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commits when the block exits normally, rolls back (and re-raises) otherwise.

        Inside :meth:`atomic` on the same thread, the block's transaction instead (it commits or rolls back
        when the ``atomic`` block ends)."""
        joined = getattr(self._local, "session", None)
        if joined is not None:
            yield joined
            return
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Run the store calls made in the block on this thread in one transaction: every write is
        committed when the block ends, or none is (an exception, a killed process). Other threads keep
        their own transactions. A nested ``atomic`` joins the outer one."""
        if getattr(self._local, "session", None) is not None:
            yield
            return
        with self.session() as session:
            self._local.session = session
            try:
                yield
            finally:
                self._local.session = None

    # Supernets and candidates.

    def get_or_create_supernet(
        self, sha256: str, family: str, preset: str, metadata: Mapping[str, Any] | None = None
    ) -> SupernetModel:
        """The supernet row of checkpoint ``sha256``, inserted if new (``metadata`` kept from the first).

        Raises :class:`StoreError` if the checkpoint is already stored under another family or preset.
        """
        _check_key("sha256", sha256)
        values = {"checkpoint_sha256": sha256, "family": family, "preset": preset}
        with self.session() as session:
            insert_ignore(
                session, SupernetModel, {**values, "metadata": _json_text(metadata), "created_at": utcnow()},
                ["checkpoint_sha256"],
            )  # fmt: skip
            row = session.scalars(select(SupernetModel).filter_by(checkpoint_sha256=sha256)).one()
        if (row.family, row.preset) != (family, preset):
            raise StoreError(
                f"checkpoint {sha256[:12]} is stored as {row.family}/{row.preset}, not {family}/{preset}"
            )
        return row

    def get_or_create_candidate(
        self,
        supernet_id: int,
        key: str,
        config_json: Mapping[str, Any] | str,
        resolution: int,  # pixels of the square training/sampling frame side
        params: int,  # parameter count of the exported subnet
        description: str = "",
    ) -> CandidateModel:
        """The candidate ``key`` of ``supernet_id``, inserted if new.

        Raises :class:`StoreError` if ``key`` is already stored with a different config (a broken hash).
        """
        _check_key("key", key)
        config_text = _json_text(config_json)
        values = {
            "supernet_id": supernet_id, "key": key, "config_json": config_text, "resolution": int(resolution),
            "params": int(params), "description": description,
        }  # fmt: skip
        with self.session() as session:
            insert_ignore(session, CandidateModel, values, ["supernet_id", "key"])
            row = session.scalars(select(CandidateModel).filter_by(supernet_id=supernet_id, key=key)).one()
        if json.loads(row.config_json) != json.loads(config_text):
            raise StoreError(f"candidate key {key[:12]} is already stored with a different config")
        return row

    # Measurements.

    def find_measurement(
        self,
        candidate_id: int,
        metric: str,
        protocol: str,
        device: str,
        cache_key: str | None = None,  # None: any key (the newest row, an 'ok' one first); not a cache
    ) -> MeasurementModel | None:
        """The stored measurement (``'ok'`` or ``'failed'``) for this key, or ``None`` (the cache).

        Without ``cache_key`` it is the newest row under any key (an ``'ok'`` row before a failed one):
        for showing what was recorded, never for deciding that a value can be reused."""
        key = {"candidate_id": candidate_id, "metric": metric, "protocol": protocol, "device": device}
        with self.session() as session:
            if cache_key is not None:
                statement = select(MeasurementModel).filter_by(**key, cache_key=cache_key)
                return session.scalars(statement).one_or_none()
            ok_first = case((MeasurementModel.status == "ok", 1), else_=0).desc()
            statement = (
                select(MeasurementModel).filter_by(**key).order_by(ok_first, MeasurementModel.id.desc())
            )
            return session.scalars(statement.limit(1)).one_or_none()

    def record_measurement(
        self,
        candidate_id: int,
        metric: str,
        value: float,
        *,
        protocol: str,
        device: str,
        unit: str = "",
        std: float | None = None,
        extractor: str | None = None,
        torch_version: str | None = None,  # None: the installed torch's version
        seed: int | None = None,
        extra: Mapping[str, Any] | None = None,
        wall_s: float | None = None,  # seconds the measurement took; None: unknown
        cache_key: str = "",  # what produced the value beyond protocol and device ('' : unnamed)
        identity: Mapping[str, Any] | None = None,  # the parts cache_key hashes, kept readable
    ) -> MeasurementModel:
        """Store a successful measurement and return the stored row.

        Idempotent: if an ``'ok'`` row already exists for ``(candidate, metric, protocol, device,
        cache_key)`` (for instance a racing worker's), that row is returned unchanged; a ``'failed'`` row
        is replaced.
        """
        if value is None:
            raise StoreError(f"measurement {metric!r} has no value; use record_failure for failed attempts")
        fields = {"value": float(value), "std": None if std is None else float(std), "error": None}
        return self._record(candidate_id, metric, protocol, device, "ok", fields, unit, extractor,
                            torch_version, seed, extra, wall_s, cache_key, identity)  # fmt: skip

    def record_failure(
        self,
        candidate_id: int,
        metric: str,
        error: str,
        *,
        protocol: str,
        device: str,
        unit: str = "",
        extractor: str | None = None,
        torch_version: str | None = None,  # None: the installed torch's version
        seed: int | None = None,
        extra: Mapping[str, Any] | None = None,
        wall_s: float | None = None,  # seconds until the failure; None: unknown
        cache_key: str = "",  # as record_measurement
        identity: Mapping[str, Any] | None = None,
    ) -> MeasurementModel:
        """Store a failed attempt (``status='failed'``, ``value=None``, ``error`` kept) and return the row.

        Never replaces an ``'ok'`` row (which is returned instead); replaces an older failure.
        """
        fields = {"value": None, "std": None, "error": str(error)}
        return self._record(candidate_id, metric, protocol, device, "failed", fields, unit, extractor,
                            torch_version, seed, extra, wall_s, cache_key, identity)  # fmt: skip

    def _record(
        self, candidate_id: int, metric: str, protocol: str, device: str, status: str,
        fields: dict[str, Any], unit: str, extractor: str | None, torch_version: str | None,
        seed: int | None, extra: Mapping[str, Any] | None, wall_s: float | None, cache_key: str,
        identity: Mapping[str, Any] | None,
    ) -> MeasurementModel:  # fmt: skip
        if len(cache_key) > 64:
            raise StoreError(f"cache_key must be at most 64 characters, got {len(cache_key)}")
        key = {"candidate_id": candidate_id, "metric": metric, "protocol": protocol, "device": device,
               "cache_key": cache_key}  # fmt: skip
        payload = {
            **fields, "status": status, "unit": unit, "extractor": extractor, "seed": seed,
            "torch_version": torch_version or _installed_torch_version(), "extra": _json_text(extra),
            "wall_s": wall_s, "created_at": utcnow(), "identity": _json_text(identity),
        }  # fmt: skip
        with self.session() as session:
            if insert_ignore(session, MeasurementModel, {**key, **payload}, list(key)):
                return session.scalars(select(MeasurementModel).filter_by(**key)).one()
            # Replace a failed attempt, atomically: an 'ok' row written meanwhile is never overwritten.
            session.execute(
                update(MeasurementModel).filter_by(**key, status="failed").values(**payload),
                execution_options={"synchronize_session": False},
            )
            statement = select(MeasurementModel).filter_by(**key)
            return session.scalars(statement.execution_options(populate_existing=True)).one()

    # Claims.

    def claim(
        self,
        candidate_id: int,
        metric_group: str,
        protocol: str,
        device: str,
        worker: str,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,  # seconds before another worker's claim is stale
        cache_key: str = "",  # the claimed measurement's (as record_measurement)
    ) -> bool:
        """Try to become the one worker measuring ``metric_group`` of a candidate; atomic across processes.

        Returns True when ``worker`` now holds the claim: it was free, ``worker`` already held it (this
        refreshes ``claimed_at``: re-claim periodically as a heartbeat during long measurements), or
        the holder's last claim is older than ``stale_after_s`` (a killed worker) and was taken over.
        Returns False when another worker holds a live claim or the group is finished
        (:meth:`finish_claim`). A worker that gets True measures, records, then calls ``finish_claim``;
        on a transient error it calls :meth:`release_claim` so that another worker may retry. Times come
        from the PostgreSQL server clock, so workers on different machines agree on staleness.
        """
        key = {"candidate_id": candidate_id, "metric_group": metric_group, "protocol": protocol,
               "device": device, "cache_key": cache_key}  # fmt: skip
        with self.session() as session:
            now = _db_now(session)
            values = {**key, "worker": worker, "status": "running", "claimed_at": now}
            if insert_ignore(session, ClaimModel, values, list(key)):
                return True
            cutoff = now - dt.timedelta(seconds=stale_after_s)
            statement = (
                update(ClaimModel)
                .filter_by(**key, status="running")
                .where((ClaimModel.worker == worker) | (ClaimModel.claimed_at < cutoff))
                .values(worker=worker, claimed_at=now)
            )
            result = session.execute(statement, execution_options={"synchronize_session": False})
            return result.rowcount == 1

    def finish_claim(
        self, candidate_id: int, metric_group: str, protocol: str, device: str, worker: str, *,
        cache_key: str = "",
    ) -> bool:  # fmt: skip
        """Mark ``worker``'s claim done (no one will get it again); False if ``worker`` no longer held it."""
        return self._end_claim(candidate_id, metric_group, protocol, device, worker, cache_key, finish=True)

    def release_claim(
        self, candidate_id: int, metric_group: str, protocol: str, device: str, worker: str, *,
        cache_key: str = "",
    ) -> bool:  # fmt: skip
        """Drop ``worker``'s running claim so that another may retry; False if ``worker`` did not hold it."""
        return self._end_claim(candidate_id, metric_group, protocol, device, worker, cache_key, finish=False)

    def _end_claim(
        self, candidate_id: int, metric_group: str, protocol: str, device: str, worker: str,
        cache_key: str, finish: bool,
    ) -> bool:  # fmt: skip
        key = {"candidate_id": candidate_id, "metric_group": metric_group, "protocol": protocol,
               "device": device, "cache_key": cache_key, "worker": worker, "status": "running"}  # fmt: skip
        statement = update(ClaimModel).filter_by(**key).values(status="done") if finish else (
            delete(ClaimModel).filter_by(**key)
        )  # fmt: skip
        with self.session() as session:
            result = session.execute(statement, execution_options={"synchronize_session": False})
            return result.rowcount == 1

    # Trial links and analysis.

    def link_trial(
        self,
        candidate_id: int,
        study_name: str,
        searcher: str,
        *,
        optuna_trial_id: int | None = None,
        trial_number: int | None = None,
        setting: Mapping[str, Any] | None = None,
    ) -> TrialLinkModel:
        """Link a candidate to an Optuna trial; idempotent per ``(candidate, study, trial_number)``.

        ``setting`` is the measurement setting the trial's values came from (``device``, ``extractor``,
        ``protocols``): an analysis of the study reads only rows of that setting (``None``: any setting).
        Links without ``trial_number`` are always inserted (nothing identifies a repeat).
        """
        values = {"candidate_id": candidate_id, "study_name": study_name, "searcher": searcher,
                  "optuna_trial_id": optuna_trial_id, "trial_number": trial_number,
                  "setting": json.dumps(dict(setting or {}), sort_keys=True),
                  "created_at": utcnow()}  # fmt: skip
        with self.session() as session:
            if trial_number is None:
                row = TrialLinkModel(**values)
                session.add(row)
                session.flush()
                return row
            insert_ignore(session, TrialLinkModel, values, ["candidate_id", "study_name", "trial_number"])
            return session.scalars(
                select(TrialLinkModel).filter_by(
                    candidate_id=candidate_id, study_name=study_name, trial_number=trial_number
                )
            ).one()

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold a lock named ``name`` across every process using this store while the block runs.

        PostgreSQL: a session-level advisory lock on a dedicated connection. SQLite: ``flock`` on a file
        beside the database (processes on one machine, as SQLite itself requires).
        """
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with self._engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    connection.commit()
            else:
                # Not a database transaction: Optuna writes to the same file inside the block.
                path = sqlite_path(self._url)
                lock_path = f"{path}.{key & 0xFFFFFFFF:08x}.lock" if path else None
                if lock_path is None:  # in-memory database: one process only
                    yield
                    return
                with open(lock_path, "a+") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(handle, fcntl.LOCK_UN)

    def measurements_frame(self, superseded: bool = False) -> pd.DataFrame:
        """One row per measurement (columns ``FRAME_COLUMNS``), joined with its candidate and supernet.

        ``config``, ``extra`` and ``identity`` are parsed dicts; ``study_names``, ``trial_numbers`` and
        ``searchers`` are aligned lists of the candidate's trial links (empty when it has none). A value
        measured again under another cache key (a torch upgrade, a metric's version bump, other
        extractor weights) has several rows for one ``(candidate, metric, protocol, device)``: only the
        newest is kept (an ``'ok'`` one before a failure), so that an analysis sees one value per
        setting, unless ``superseded`` (then every row).
        """
        import pandas as pd

        with self.session() as session:
            rows = session.execute(
                select(MeasurementModel, CandidateModel, SupernetModel)
                .join(CandidateModel, MeasurementModel.candidate_id == CandidateModel.id)
                .join(SupernetModel, CandidateModel.supernet_id == SupernetModel.id)
                .order_by(MeasurementModel.id)
            ).all()
            links = session.scalars(select(TrialLinkModel).order_by(TrialLinkModel.id)).all()
        links_by_candidate: dict[int, list[TrialLinkModel]] = {}
        for link in links:
            links_by_candidate.setdefault(link.candidate_id, []).append(link)
        if not superseded:
            newest: dict[tuple, tuple[MeasurementModel, CandidateModel, SupernetModel]] = {}
            for row in rows:  # ascending ids: a later row of the same rank replaces an earlier one
                m = row[0]
                key = (m.candidate_id, m.metric, m.protocol, m.device)
                held = newest.get(key)
                if held is None or (m.status == "ok") >= (held[0].status == "ok"):
                    newest[key] = row
            rows = sorted(newest.values(), key=lambda row: row[0].id)
        records = [frame_record(m, c, s, links_by_candidate.get(c.id, [])) for m, c, s in rows]
        return pd.DataFrame.from_records(records, columns=list(FRAME_COLUMNS))
