"""The SQL store of every measurement: one database shared with Optuna's ``RDBStorage``.

``Store.open(url)`` creates or upgrades the ``sned_`` tables; ``Store.open_existing(url)`` (read-only
commands) creates nothing and refuses a missing store; ``optuna_storage(url)`` gives Optuna the same
database (``create=False``: refuse one without Optuna's tables); ``redact_url`` before printing any URL. See ``harness/store/store.py`` for the concurrency contract.
"""

from ._migrations import SCHEMA_VERSION
from .store import Store
from .urls import StoreError, optuna_storage, redact_url, validate_storage_url

__all__ = ["SCHEMA_VERSION", "Store", "StoreError", "optuna_storage", "redact_url", "validate_storage_url"]
