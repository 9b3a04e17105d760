"""`meter sql`: one read-only statement over the ledger, confined to its tables.

What a user's SQL may do is decided here, per dialect, by the database itself
wherever it can be, and by a check of the text only as a second line:

- DuckDB: exactly one statement of type SELECT (DuckDB's own parser,
  `extract_statements`), run on a connection of a database whose configuration
  was confined by `confine_duckdb` before any user SQL ran:
  `enable_external_access=false` (no file, URL or ATTACH: `read_csv`,
  `read_text`, `COPY ... TO`, `glob`), no extension installed or loaded, and
  the configuration locked (no SET or PRAGMA can undo it).  The serving ledger
  process confines its own database at open: measured, its batch inserts,
  CHECKPOINT and WAL replay work unchanged under these settings.  A stopped
  file is attached read-only to a fresh in-memory database, confined the same way.
- PostgreSQL: one statement (the extended protocol refuses a second), which
  must begin SELECT, WITH, VALUES or TABLE, run in a READ ONLY transaction with
  a statement_timeout.  Reading server files or running programs needs a
  superuser (or the pg_read_server_files / pg_execute_server_program roles):
  meter relies on its ledger role being none of these, and refuses by name the
  known functions that reach outside the ledger anyway (`pg_read_file`,
  `lo_import`, `dblink`, `query_to_xml`, `set_config`, ...).

Answers are bounded: at most `limit` rows and `MAX_BYTES` of values (the rest
is left off and `truncated` says why), and `timeout` seconds, after which the
query is interrupted.  A refused statement or bad SQL raises `SqlError` with the
database's own first line.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LIMIT = 10_000
DEFAULT_TIMEOUT = 30.0
MAX_BYTES = 16 * 1024 * 1024  # of values, counted as their text; the JSON answer is about this size

_DUCKDB_CONFINED = (
    "SET enable_external_access = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET lock_configuration = true",
)


class SqlError(ValueError):
    """Bad SQL, or a statement meter refuses: one line, the database's own first."""


@dataclass
class SqlResult:
    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    truncated: str | None = None  # "rows" or "bytes" when rows were left off


def first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def confine_duckdb(con: Any) -> None:
    """Confine a DuckDB database for good (it cannot be undone while it is open)."""
    for statement in _DUCKDB_CONFINED:
        con.execute(statement)


def _approx_bytes(row: tuple[Any, ...]) -> int:
    return sum(len(str(v)) + 4 for v in row)


class _Collector:
    """Rows up to the bounds; says whether (and why) some were left off."""

    def __init__(self, columns: list[str], limit: int, max_bytes: int) -> None:
        self.result = SqlResult(columns)
        self.limit = limit
        self.max_bytes = max_bytes
        self.size = 0

    def take(self, rows: list[tuple[Any, ...]]) -> bool:
        """Keep what fits; False once full."""
        for row in rows:
            if len(self.result.rows) >= self.limit:
                self.result.truncated = "rows"
                return False
            self.size += _approx_bytes(row)
            if self.size > self.max_bytes:
                self.result.truncated = "bytes"
                return False
            self.result.rows.append(tuple(row))
        return True


def duckdb_sql(con: Any, sql: str, limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_BYTES) -> SqlResult:
    """Run one SELECT on a cursor of `con`, a connection to a database `confine_duckdb` confined."""
    import duckdb

    from .duckdb_store import quiet_cursor

    cur = quiet_cursor(con)
    timer = threading.Timer(timeout, cur.interrupt)
    try:
        try:
            statements = cur.extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlError(first_line(exc)) from None
        if len(statements) != 1:
            raise SqlError(f"one statement at a time, got {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            raise SqlError(f"only a SELECT is run, not {statements[0].type.name}")
        timer.start()
        try:
            res = cur.execute(sql)
            collector = _Collector([d[0] for d in res.description], limit, max_bytes)
            while (batch := res.fetchmany(min(limit + 1, 2048))) and collector.take(batch):
                pass
        except (duckdb.InterruptException, RuntimeError) as exc:
            if not timer.is_alive() and "interrupt" in str(exc).lower():
                raise SqlError(f"the query ran past its {timeout:g}s timeout") from None
            raise
        except duckdb.IOException:
            raise  # the store, not the statement
        except duckdb.Error as exc:
            raise SqlError(first_line(exc)) from None
        return collector.result
    finally:
        timer.cancel()
        cur.close()


# PostgreSQL -------------------------------------------------------------------------

_PG_START = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*|\(\s*)*(select|with|values|table)\b", re.IGNORECASE | re.DOTALL)
# Functions that reach past the ledger's tables: server files and programs, large
# objects, other databases, settings, other sessions, or SQL run from a string (which
# takes an expression, so it can spell any name past this list: ts_stat, ts_rewrite,
# tablefunc's crosstab and connectby, xml2's xpath_table, the *_to_xml family).
_PG_REFUSED = re.compile(
    r"\b(pg_read_file|pg_read_binary_file|pg_ls_\w+|pg_stat_file|pg_file_\w+|lo_\w+|loread|lowrite|dblink\w*|"
    r"\w+_to_xml\w*|query_to_xmlschema|xpath\w*|ts_stat|ts_rewrite|crosstab\w*|connectby|set_config|current_setting|pg_terminate_backend|pg_cancel_backend|"
    r"pg_reload_conf|pg_rotate_logfile|pg_logdir_ls|pg_promote|pg_switch_wal|pg_create_\w+|pg_drop_\w+|"
    r"pg_advisory\w*|pg_try_advisory\w*|pg_notify|pg_import_system_collations|txid_\w+|pg_logical_emit_message)\b",
    re.IGNORECASE,
)


# `U&"..."` and `U&'...'`: a name or string with Unicode escapes, in which any name
# can be spelled past the list above (`U&"lo\005fcreate"` is lo_create).  A query of
# the ledger never needs one.
_PG_UNICODE_ESCAPES = re.compile(r"\bu&[\"']", re.IGNORECASE)


def check_postgres_statement(sql: str) -> None:
    """Refuse what a READ ONLY transaction would still run: anything but a query, and
    the functions that reach outside the ledger (in any quoting or case).  What gets
    past this list still cannot stay: the transaction is rolled back (`_postgres_sql`)."""
    if not _PG_START.match(sql):
        raise SqlError("only a query is run: SELECT, WITH, VALUES or TABLE")
    if _PG_UNICODE_ESCAPES.search(sql):
        raise SqlError("refused: a U& (Unicode-escaped) name or string can spell any function")
    found = _PG_REFUSED.search(sql.replace('"', ""))
    if found:
        raise SqlError(f"refused: {found.group(1)}() reaches outside the ledger")


async def _postgres_sql(url: str, sql: str, limit: int, timeout: float, max_bytes: int, connect_timeout: float) -> SqlResult:
    import asyncpg

    con = await asyncpg.connect(url, timeout=connect_timeout, command_timeout=timeout + 5)
    try:
        # READ ONLY, and never committed: PostgreSQL still runs some functions that
        # change things in a read-only transaction (lo_create makes a large object), so
        # whatever got past `check_postgres_statement` is rolled back with the rest.
        transaction = con.transaction(readonly=True)
        await transaction.start()
        try:
            await con.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            statement = await con.prepare(sql)  # the extended protocol: one statement, never two
            collector = _Collector([a.name for a in statement.get_attributes()], limit, max_bytes)
            cursor = await statement.cursor()
            while (batch := await cursor.fetch(min(limit + 1, 2048))) and collector.take([tuple(r) for r in batch]):
                pass
        except asyncpg.QueryCanceledError:
            raise SqlError(f"the query ran past its {timeout:g}s timeout") from None
        except (asyncpg.PostgresSyntaxError, asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError) as exc:
            raise SqlError(first_line(exc)) from None
        except asyncpg.PostgresError as exc:
            if type(exc).__name__.startswith(("Connection", "CannotConnect", "AdminShutdown")):
                raise
            raise SqlError(first_line(exc)) from None
        finally:
            # A connection that broke (or a rollback that fails) aborts the transaction
            # as surely: the server ends it uncommitted when the connection closes.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                if not con.is_closed():
                    await transaction.rollback()
        return collector.result
    finally:
        await con.close()


def postgres_sql(url: str, sql: str, limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_BYTES, connect_timeout: float = 10.0) -> SqlResult:
    """Run one query on a connection of its own, in a READ ONLY transaction (blocking)."""
    import asyncio

    check_postgres_statement(sql)
    return asyncio.run(_postgres_sql(url, sql, limit, timeout, max_bytes, connect_timeout))
