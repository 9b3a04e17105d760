"""The ledger: where every record is stored, and where reports read it (SPEC §4).

- `store`: the `Store` protocol every reader and the writer go through, and its errors;
- `schema`: the columns and their types per dialect, the "has usage" and usage-claim rules;
- `migrations`: one runner and one append-only list of steps for both dialects;
- `duckdb_store`, `child_store` (the same in a child process, as `meter serve`
  runs it; `__main__` is that process), `postgres_store` over `postgres_session`;
- `stores`: which store for a ledger (`store_for`, `open_reader`);
- `sanitise`: the one step that makes every record storable, in every store;
- `writer`: `LedgerWriter`, which batches records off the request path, with
  its spool and rejected files (`spool`).

The names below are imported on first use (PEP 562), not with the package: the
ledger process (`python -m meter.ledger`) imports this package first, and needs
none of PostgreSQL's client, the writer or asyncio; importing them all made that
process 13 MB larger for nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .child_store import ChildProcessStore, LedgerChildError
    from .duckdb_store import DuckDBStore
    from .postgres_session import PostgresLedgerError, PostgresRefused
    from .postgres_store import PostgresStore
    from .schema import COLUMN_TYPES, HAS_USAGE_SQL, SQL_TYPES
    from .spool import RejectedFile, Spool
    from .store import LedgerNotOpen, LedgerReadError, LedgerRefused, LedgerUnavailable, LedgerUnusable, Store
    from .stores import is_postgres_url, open_reader, store_for
    from .writer import LedgerStats, LedgerWriter

# Each public name and the submodule that defines it.
_HOMES = {
    "ChildProcessStore": "child_store",
    "LedgerChildError": "child_store",
    "DuckDBStore": "duckdb_store",
    "PostgresLedgerError": "postgres_session",
    "PostgresRefused": "postgres_session",
    "PostgresStore": "postgres_store",
    "COLUMN_TYPES": "schema",
    "HAS_USAGE_SQL": "schema",
    "SQL_TYPES": "schema",
    "RejectedFile": "spool",
    "Spool": "spool",
    "LedgerNotOpen": "store",
    "LedgerReadError": "store",
    "LedgerRefused": "store",
    "LedgerUnavailable": "store",
    "LedgerUnusable": "store",
    "Store": "store",
    "is_postgres_url": "stores",
    "open_reader": "stores",
    "store_for": "stores",
    "LedgerStats": "writer",
    "LedgerWriter": "writer",
}

__all__ = [
    "COLUMN_TYPES",
    "HAS_USAGE_SQL",
    "SQL_TYPES",
    "ChildProcessStore",
    "DuckDBStore",
    "LedgerChildError",
    "LedgerNotOpen",
    "LedgerReadError",
    "LedgerRefused",
    "LedgerStats",
    "LedgerUnavailable",
    "LedgerUnusable",
    "LedgerWriter",
    "PostgresLedgerError",
    "PostgresRefused",
    "PostgresStore",
    "RejectedFile",
    "Spool",
    "Store",
    "is_postgres_url",
    "open_reader",
    "store_for",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
