"""The ledger: where every record is stored, and where reports read it (SPEC §4).

One `Store` protocol (`store`), three stores (`duckdb_store`, `child_store`,
`postgres_store`), one schema and one migration runner for both dialects
(`schema`, `migrations`), the one sanitising step every record passes
(`sanitise`), the writer that batches records off the request path
(`writer`) with its spool and rejected files (`spool`), and the choice of
store for a ledger (`stores`).
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
