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
"""

from .child_store import ChildProcessStore, LedgerChildError
from .duckdb_store import DuckDBStore
from .postgres_session import PostgresLedgerError, PostgresRefused
from .postgres_store import PostgresStore
from .schema import COLUMN_TYPES, HAS_USAGE_SQL, SQL_TYPES
from .spool import RejectedFile, Spool
from .store import LedgerNotOpen, LedgerReadError, LedgerRefused, LedgerUnavailable, LedgerUnusable, Store
from .stores import is_postgres_url, open_reader, store_for
from .writer import LedgerStats, LedgerWriter

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
