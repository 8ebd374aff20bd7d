"""Storage URLs: validation, normalisation, redaction, and the engines (the store's, Optuna's) for them.

Accepted forms (anything else raises :class:`StoreError`):
    * a bare file path (``results/store.db``, ``~/runs/store.db``) -> ``sqlite:////abs/path``;
    * ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` -> ``sqlite:////abs/path``;
    * ``postgresql://user:password@host[:port]/db``, ``postgres://...`` or ``postgresql+psycopg2://...``
      -> ``postgresql+psycopg2://...`` (the driver made explicit: SQLAlchemy 2.1 maps a bare
      ``postgresql://`` to psycopg 3, while this project has always run bare URLs on psycopg2, so a
      bare URL keeps meaning what it meant). Give the normalised URL to ``optuna-dashboard`` too;
    * ``postgresql+psycopg://...`` (psycopg 3, the driver SQLAlchemy 2 documents first) -> unchanged.

Never print, log or store a URL without :func:`redact_url`. All functions here are pure apart from the
filesystem checks of :func:`validate_storage_url` (which create nothing) and the parent directory that
:func:`ensure_parent_directory` and :func:`optuna_storage` (unless ``create=False``) create; they are safe to call from any thread
or process. An engine (``create_store_engine``, ``optuna_storage``) belongs to the process that made it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

if TYPE_CHECKING:
    from collections.abc import Callable

    import optuna

ACCEPTED_FORMS = (
    "a file path, sqlite:///path.db, postgresql://user:pass@host[:port]/db, "
    "postgresql+psycopg2://... or postgresql+psycopg://... (psycopg 3)"
)
_SQLITE_DRIVERS = ("sqlite", "sqlite+pysqlite")
_POSTGRES_DRIVERS = ("postgresql", "postgresql+psycopg2", "postgresql+psycopg")
_DEFAULT_POSTGRES_DRIVER = "postgresql+psycopg2"  # what a bare postgresql:// URL runs on
# Python module each PostgreSQL driver needs, and how to get it (checked before any engine is made, so a
# missing driver is one line, not SQLAlchemy's traceback).
_DRIVER_MODULES = {
    "postgresql+psycopg2": ("psycopg2", "pip install psycopg2-binary"),
    "postgresql+psycopg": ("psycopg", "pip install 'psycopg[binary]'"),
}
# The fix named when a read-only command is given a store that is not there (a mistyped --storage).
EXISTING_STORE_FIX = "check --storage: it must name a store that python -m harness.search or evaluate wrote"
SQLITE_TIMEOUT_S = 30.0  # seconds a SQLite connection waits for a lock before "database is locked"


class StoreError(ValueError):
    """A one-line, user-facing store error: bad URL, unwritable path, schema version, conflicting rows."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``postgresql://user:***@host/db``); never raises.

    Also hides a ``password=`` query parameter. Strings without a password are returned unchanged.
    """
    url = str(url)
    url = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if "@" not in netloc:
        return url
    userinfo, host = netloc.rsplit("@", 1)
    if ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{tail}"


def _fail(url: str, reason: str) -> StoreError:
    return StoreError(f"invalid storage URL {redact_url(url)!r}: {reason}; accepted: {ACCEPTED_FORMS}")


def _check_sqlite_path(path: Path) -> None:
    """Raise unless a SQLite database (plus its -wal/-shm files) can be created or written at ``path``.

    Creates nothing: it inspects the nearest existing ancestor directory.
    """
    if path.exists():
        if not path.is_file():
            raise StoreError(f"cannot use SQLite store {path}: it exists and is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(f"cannot use SQLite store {path}: the file is not readable and writable")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StoreError(f"cannot create SQLite store {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create SQLite store {path}: directory {ancestor} is not writable")


def _normalise_sqlite(raw: str, parsed: URL) -> str:
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise _fail(raw, "in-memory or URI-style SQLite databases cannot be shared; give a file path")
    path = Path(os.path.abspath(os.path.expanduser(database)))
    _check_sqlite_path(path)
    return URL.create("sqlite", database=str(path), query=parsed.query).render_as_string(hide_password=False)


def _normalise_postgres(raw: str, parsed: URL) -> str:
    if not parsed.database:
        raise _fail(raw, "no database name")
    driver = _DEFAULT_POSTGRES_DRIVER if parsed.drivername == "postgresql" else parsed.drivername
    module, install = _DRIVER_MODULES[driver]
    if importlib.util.find_spec(module) is None:
        raise _fail(raw, f"driver {driver} needs the Python module {module!r}, not installed ({install})")
    return f"{driver}://{raw.partition('://')[2]}"


def validate_storage_url(url: str | os.PathLike[str]) -> str:
    """Normalised storage URL for ``url``; raises a one-line :class:`StoreError` when it is unusable.

    SQLite URLs come back as ``sqlite:////absolute/path`` after checking that the file, or the nearest
    existing ancestor directory, is writable; nothing is created, so a bad path leaves nothing behind.
    PostgreSQL URLs are checked for form only (no connection is made) and name their driver: psycopg 3
    when asked for (``postgresql+psycopg://``), psycopg2 otherwise.
    """
    raw = os.fspath(url).strip() if isinstance(url, os.PathLike) else str(url).strip()
    if not raw:
        raise _fail(raw, "empty")
    if "://" not in raw:
        path = Path(os.path.abspath(os.path.expanduser(raw)))
        _check_sqlite_path(path)
        return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    try:
        parsed = make_url(raw)
    except ArgumentError:
        raise _fail(raw, "not a parseable URL") from None
    if parsed.drivername in _SQLITE_DRIVERS:
        return _normalise_sqlite(raw, parsed)
    if parsed.drivername in _POSTGRES_DRIVERS:
        return _normalise_postgres(raw, parsed)
    raise _fail(raw, f"unsupported backend {parsed.drivername!r}")


def sqlite_path(url: str) -> Path | None:
    """Database file of a validated SQLite URL, or ``None`` for other backends."""
    parsed = make_url(url)
    if parsed.drivername not in _SQLITE_DRIVERS or not parsed.database:
        return None
    return Path(parsed.database)


def require_existing_database(url: str) -> None:
    """Raise a one-line :class:`StoreError` unless the SQLite file of a validated URL exists.

    For read-only commands, so that a mistyped ``--storage`` fails instead of creating an empty database.
    PostgreSQL URLs pass (a server database is never created by connecting; the tables are checked later).
    """
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise StoreError(f"no store at {redact_url(url)}: {path} does not exist; {EXISTING_STORE_FIX}")


def require_table(url: str, table: str, missing: str) -> None:
    """Raise a one-line :class:`StoreError` (``missing`` + the redacted URL + the fix) unless the
    database of a validated ``url`` holds ``table``, or when it cannot be read at all. Writes nothing."""
    # A plain engine: the store's engine would switch a foreign SQLite file to WAL just to look at it.
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            present = inspect(connection).has_table(table)
    except DBAPIError as error:
        reason = (str(error.orig).strip() or type(error.orig).__name__).splitlines()[0]
        raise StoreError(f"cannot open store {redact_url(url)}: {reason}; {EXISTING_STORE_FIX}") from None
    finally:
        engine.dispose()
    if not present:
        raise StoreError(f"{missing} in {redact_url(url)}; {EXISTING_STORE_FIX}")


def ensure_parent_directory(url: str) -> None:
    """Create the parent directory of a validated SQLite URL (no-op for other backends)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def create_store_engine(url: str) -> Engine:
    """Engine for a validated URL; SQLite gets WAL, a busy timeout, foreign keys and BEGIN IMMEDIATE."""
    if sqlite_path(url) is None:
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction upgrading to a writer fails without waiting.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def optuna_storage(
    url: str | os.PathLike[str],
    *,
    heartbeat_interval: int | None = None,  # seconds between trial heartbeats; None: no heartbeat
    grace_period: int | None = None,  # seconds without heartbeat before a trial is stale; None: Optuna's
    heartbeat_stale_trial_callback: Callable[[optuna.study.Study, optuna.trial.FrozenTrial], None]
    | None = None,
    create: bool = True,  # False (read-only commands): refuse a missing database or one without Optuna's tables
) -> optuna.storages.RDBStorage:
    """Optuna ``RDBStorage`` on the same database as ``Store(url)`` (Optuna's tables beside ``sned_``'s).

    SQLite connections wait ``SQLITE_TIMEOUT_S`` for locks; PostgreSQL connections are pre-pinged. Pass
    ``heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(...)`` with a
    heartbeat to retry trials of killed workers. Use PostgreSQL, never SQLite, for parallel workers.
    With ``create=False`` nothing is created: a missing SQLite file, or a database without Optuna's
    tables, raises a one-line :class:`StoreError` naming the (redacted) URL and the fix.
    """
    import optuna

    normalised = validate_storage_url(url)
    if not create:
        require_existing_database(normalised)
        require_table(normalised, "studies", "no Optuna studies")
    engine_kwargs: dict[str, Any]
    if sqlite_path(normalised) is not None:
        if create:
            ensure_parent_directory(normalised)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        normalised,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
    )
