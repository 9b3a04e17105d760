"""Which store for which ledger: the one `meter serve` writes through, and the ones
`meter report` and `meter reprice` read.

A ledger is a DuckDB file or a `postgresql://` URL.  Readers of DuckDB files
attach each file read-only to one in-memory DuckDB and read them through a view
`requests` (the UNION ALL of every file's table, by column name), so the same
SQL `FROM requests` works on every store and the replicas of a fleet report as
one.  A DuckDB file is held by the `meter serve` that writes it: a reader is
told to ask that meter's admin API instead, a writer (`meter reprice`) to stop
it first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..config import Settings, redact_url
from .child_store import ChildProcessStore
from .duckdb_store import DuckDBStore, holder_named
from .store import LedgerReadError, Store


def is_postgres_url(ledger: str) -> bool:
    return ledger.startswith(("postgresql://", "postgres://"))


def store_for(settings: Settings) -> Store:
    """The store `meter serve` writes through, not yet open."""
    if settings.ledger_is_postgres:
        from .postgres_store import PostgresStore

        return PostgresStore(settings.ledger)
    # DuckDB runs in a child process: in the proxy's process its GIL hand-offs
    # cost the event loop several times the insert itself (see child_store).
    return ChildProcessStore(settings.ledger)


def open_reader(ledgers: Sequence[str], *, writable: bool = False) -> Store:
    """A store over the ledgers `meter report --ledger` or `meter reprice` was given.

    One PostgreSQL URL (never migrated; it connects at the first query), or
    DuckDB files read as one; with `writable`, exactly one DuckDB file opened for
    writing.  Raises `LedgerReadError` with one line, without a password.
    """
    postgres = [ledger for ledger in ledgers if is_postgres_url(ledger)]
    if postgres:
        if len(ledgers) > 1:
            raise LedgerReadError("--ledger: a PostgreSQL ledger already holds every replica's rows; give it alone")
        from .postgres_store import PostgresStore

        return PostgresStore(postgres[0], migrate=False)
    for ledger in ledgers:
        if "://" in ledger:
            hint = "" if writable else " (for a running meter use --url)"
            raise LedgerReadError(f"--ledger: a ledger is a DuckDB file or a postgresql:// URL, got {redact_url(ledger)!r}{hint}")
    unique: dict[str, str] = {}
    for path in ledgers:
        if not os.path.exists(path):
            raise LedgerReadError(f"ledger: no such file: {path}")
        unique.setdefault(os.path.realpath(path), path)  # the same file twice is still one ledger
    paths = list(unique.values())
    if writable:
        if len(paths) != 1:
            raise LedgerReadError(f"--ledger: one DuckDB file is written at a time, got {len(paths)}")
        return _open_duckdb_for_writing(paths[0])
    return _open_duckdb_files(paths)


def _open_duckdb_for_writing(path: str) -> DuckDBStore:
    import duckdb

    try:
        con = duckdb.connect(path)
    except duckdb.Error as exc:
        raise _duckdb_error(path, exc, writable=True) from None
    try:
        found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'requests'").fetchone()
        if not found or not found[0]:
            raise LedgerReadError(f"ledger: {path} has no requests table (not a meter ledger?)")
    except BaseException:
        con.close()
        raise
    return DuckDBStore.over(con, path)


def _open_duckdb_files(paths: Sequence[str]) -> DuckDBStore:
    """An in-memory DuckDB with each file attached read-only as l1, l2, ... and a view
    `requests` over all of them."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        aliases = []
        for n, path in enumerate(paths, 1):
            alias = f"l{n}"
            try:
                con.execute(f"ATTACH {_sql_string(path)} AS {alias} (READ_ONLY)")
            except duckdb.Error as exc:
                raise _duckdb_error(path, exc, writable=False) from None
            found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = $1 AND table_name = 'requests'", [alias]).fetchone()
            if not found or not found[0]:
                raise LedgerReadError(f"ledger: {path} has no requests table (not a meter ledger?)")
            aliases.append(alias)
        # A view of the reader's own in-memory database, not a TEMP one: each read
        # runs on a cursor (a connection of its own), which sees no other's temp objects.
        union = " UNION ALL BY NAME ".join(f"SELECT * FROM {alias}.requests" for alias in aliases)
        con.execute(f"CREATE VIEW requests AS {union}")
    except BaseException:
        con.close()
        raise
    return DuckDBStore.over(con, ", ".join(paths))


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _duckdb_error(path: str, exc: Any, *, writable: bool) -> LedgerReadError:
    message = str(exc)
    if "lock" in message.lower():
        hint = "; stop that meter first" if writable else "; ask the running meter with --url http://ADMIN instead"
        # DuckDB names its holder: for meter, the ledger child; say the `meter serve` to stop or ask.
        holder = holder_named(message)
        held = f", held by {holder}" if holder else ""
        return LedgerReadError(f"ledger: {path} is open in a running meter{held}{hint}")
    first = message.splitlines()[0] if message else type(exc).__name__
    return LedgerReadError(f"ledger: cannot read {path}: {first}")
