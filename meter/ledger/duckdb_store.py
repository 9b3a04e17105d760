"""The DuckDB store: a ledger in one file (SPEC §4).

`meter serve` runs it in a child process (`child_store`); `meter report` and
`meter reprice` open files with it directly (`readers`), and so do tests.

- Writes: one transaction per batch.  The batch goes in through DuckDB's appender
  into a temporary staging table, then one INSERT ... SELECT converts it to the
  table's types (`_Staging`; a DuckDB without an appender takes one list
  parameter per column, unnested: `batch_select`), less the rows whose ids the
  ledger already has (no primary key: an index on random UUIDs halves insert
  speed), so a retried batch adds nothing.  Usage of a background response
  counts once (`schema.claim_usage` against the `usage_claims` table).
- Reads run on a cursor of their own (a second connection to the same
  database), so a reader in another thread never shares the writer's
  transaction, and `iter_query` streams its result in batches.
- `prune` deletes old rows and the claims that follow them (`prune`) in one
  transaction.
- `set_costs` stages the changes in a temporary table, chunk by chunk, and
  applies them with one UPDATE join in one transaction, on a cursor of its
  own, so it can be fed by an `iter_query` of the same store.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import operator
import os
import re
import signal
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..record import COLUMNS, Record
from . import alert_claims
from .alert_claims import AlertClaim
from .migrations import migrate
from .prune import PRESENT_TABLES_SQL, Pruned, statements, tally
from .schema import COLUMN_TYPES, claim_usage, needs_claim, select_from_batch
from .spool import check_directory
from .store import COST_CHUNK_ROWS, LedgerNotOpen, LedgerUnavailable, LedgerUnusable, chunks

log = logging.getLogger("meter.ledger")

# How a batch is staged: UUIDs and JSON as text, timestamps as epoch seconds
# (`schema.select_from_batch` converts each to the table's type); the rest as is.
_STAGED = {"UUID": "VARCHAR", "TIMESTAMPTZ": "DOUBLE", "JSON": "VARCHAR"}


def batch_select(given: Sequence[bool] | None = None) -> str:
    """A SELECT of a batch from one list parameter per column given (`batch_parameters`),
    in the order of `COLUMNS`; a column not given is NULL in every row.

    DuckDB converts each list straight into its own vectors: the batch costs neither
    pyarrow in the ledger process (19-40 MB of RSS for its import and its pools) nor
    a copy of every value in Arrow buffers.  Each list is cast to its exact type:
    DECIMAL(18,9) from `Decimal`, NULL from None (an empty string stays empty), and a
    value that does not fit (a BIGINT out of range, malformed JSON) fails the batch as
    a conversion error, which `store.failure_kind` calls refused."""
    given = given or (True,) * len(COLUMNS)
    return "SELECT " + ", ".join(
        f"UNNEST(?::{_STAGED.get(kind, kind)}[]) AS {name}" if is_given else f"NULL::{_STAGED.get(kind, kind)} AS {name}"
        for (name, kind), is_given in zip(COLUMN_TYPES.items(), given, strict=True)
    )


def batch_parameters(records: Sequence[Record]) -> tuple[tuple[bool, ...], list[list[Any]]]:
    """Which columns `batch_select` takes as lists, and those lists (see `_given_lists`)."""
    return _given_lists([list(map(getter, records)) for getter in _COLUMN_GETTERS])


def _given_lists(columns: Sequence[Sequence[Any]]) -> tuple[tuple[bool, ...], list[list[Any]]]:
    """A column that is None in every row is left out: converting the lists is most of
    a batch's cost, and typical records leave 18 of 44 columns empty (measured: 7.8
    against 12.5 us a row).  With no list at all (an empty batch) every column is one,
    so that the SELECT has no row rather than one row of NULLs."""
    given = tuple(column.count(None) < len(column) for column in columns)
    if not any(given):
        return (True,) * len(columns), [list(column) for column in columns]
    return given, [list(column) for column, is_given in zip(columns, given, strict=True) if is_given]


@functools.lru_cache(maxsize=64)  # one text per set of empty columns; a handful occur
def _insert_sql(given: tuple[bool, ...]) -> str:
    # By name: a ledger migrated from an older meter has later columns at its end.
    return f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT {select_from_batch('duckdb')} FROM ({batch_select(given)}) AS batch"


_COLUMN_GETTERS = [operator.attrgetter(name) for name in COLUMNS]
_ID, _STARTED_AT, _COST = COLUMNS.index("id"), COLUMNS.index("started_at"), COLUMNS.index("cost_usd")
_BIGINTS = [i for i, kind in enumerate(COLUMN_TYPES.values()) if kind == "BIGINT"]
_INT32_MAX = 2**31 - 1

# With the list parameters, a batch goes in this many rows per statement (all in the
# batch's one transaction): DuckDB holds every parameter as a boxed value while it
# binds the statement, about 6 kB a row.  Measured on batches of 6,000 rows (the
# writer's at full load), the ledger process's peak rose by up to 36 MB per batch in
# one statement, and by at most 11 MB (a checkpoint's included) in parts of 1,024
# rows, one DuckDB vector.
ROWS_PER_STATEMENT = 1024

# The batches a store remembers the ids of (`DuckDBStore._new_rows`): four flush
# intervals (2 s by default) of rows, the overlap of a batch with those before it
# under steady traffic, ~0.1 MB per thousand rows.
RECENT_BATCHES = 4

# How the appender stages a column: UUIDs, JSON and the cost as text, timestamps as
# epoch seconds, each converted to the table's type by the INSERT ... SELECT; BIGINTs
# as INTEGER in the narrow table, used when every value fits it.  Measured per value
# on DuckDB 2.0's appender: a Python int to BIGINT 205 ns, to INTEGER 46; a Decimal to
# DECIMAL(18,9) 1,320 ns, its text 390 (cast in SQL: the same value, tested); a str to
# UUID 760 ns, to VARCHAR 220.
_APPENDED = {"UUID": "VARCHAR", "TIMESTAMPTZ": "DOUBLE", "JSON": "VARCHAR", "DECIMAL(18,9)": "VARCHAR"}
_STAGING_TABLES = {False: "meter_staged_batch", True: "meter_staged_batch_narrow"}


def _appended_type(kind: str, narrow: bool) -> str:
    return "INTEGER" if narrow and kind == "BIGINT" else _APPENDED.get(kind, kind)


def _from_staged(name: str, kind: str) -> str:
    if kind == "TIMESTAMPTZ":
        return f"to_timestamp({name})"
    if kind in ("UUID", "JSON", "DECIMAL(18,9)", "BIGINT"):
        return f"{name}::{kind}"
    return name


def _fits_int32(columns: Sequence[Sequence[Any]]) -> bool:
    try:
        return all(max(map(abs, filter(None, columns[i])), default=0) <= _INT32_MAX for i in _BIGINTS)
    except TypeError:  # not a number: the wide table's conversion refuses it
        return False


def can_append(con: Any) -> bool:
    """Whether the DuckDB client has an appender (2.0); without one, list parameters."""
    return callable(getattr(con, "appender", None))


# How `_Staging` takes a column of a batch.
_NULL, _CONSTANT, _APPEND = 0, 1, 2


def _column_kind(column: Sequence[Any], n: int) -> int:
    first = column[0]
    # One value in every row (equal by ==, which meets only the same value here: the
    # exception is a float zero, whose sign == does not see).
    if column.count(first) == n and not (type(first) is float and first == 0):
        return _NULL if first is None else _CONSTANT
    return _APPEND


def _parsed(con: Any, sql: str) -> Any:
    """`sql` parsed once, to be executed many times: DuckDB 2.0's parser took ~0.4 ms
    of the ~1.7 ms an INSERT of `_Staging` costs besides its rows, at every batch."""
    (statement,) = con.extract_statements(sql)
    return statement


class _Staging:
    """Batches into `requests` through DuckDB's appender (DuckDB 2.0's Python client).

    A list parameter costs DuckDB ~500 ns a value to convert and its UNNEST of 26
    lists ~250 more; the appender converts a value in 46-220 ns into its own vectors,
    and one INSERT ... SELECT from the staging table converts them to the table's types
    in bulk (~35 ns a value).  A column None in every row is not appended (it stays
    NULL), and one with the same value in every row (the method, endpoint, model, key,
    status, ... of most batches) goes as one parameter of the INSERT instead: in
    `meter serve` under load, appending was half of the ledger process's CPU.  The
    staging tables are temporary (this connection only) and emptied in the batch's own
    transaction, so a failed batch leaves nothing in them."""

    def __init__(self, con: Any) -> None:
        self.con = con
        # (narrow, each column's kind) -> the appender (None: nothing to append) and the INSERT
        self.plans: dict[tuple[bool, tuple[int, ...]], tuple[Any, Any]] = {}
        self.empty: dict[bool, Any] = {}  # narrow -> the DELETE that empties its staging table
        for narrow, table in _STAGING_TABLES.items():
            columns = ", ".join(f"{name} {_appended_type(kind, narrow)}" for name, kind in COLUMN_TYPES.items())
            con.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({columns})")
            self.empty[narrow] = _parsed(con, f"DELETE FROM {table}")

    def _plan(self, narrow: bool, kinds: tuple[int, ...]) -> tuple[Any, Any]:
        plan = self.plans.get((narrow, kinds))
        if plan is None:
            if len(self.plans) >= 64:  # a handful of column sets occur
                self.plans.clear()
            table = _STAGING_TABLES[narrow]
            appended = [name for name, how in zip(COLUMNS, kinds, strict=True) if how == _APPEND]
            sources = {_NULL: "CAST(NULL AS {})", _CONSTANT: "CAST(? AS {})"}
            converted = ", ".join(
                _from_staged(sources[how].format(_appended_type(kind, narrow)) if how in sources else name, kind)
                for (name, kind), how in zip(COLUMN_TYPES.items(), kinds, strict=True)
            )
            # With no column appended, the rows are counted by a parameter instead.
            source = table if appended else "range(?)"
            appender = self.con.appender(table, columns=appended) if appended else None
            insert = _parsed(self.con, f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT {converted} FROM {source}")
            plan = self.plans[narrow, kinds] = (appender, insert)
        return plan

    def insert(self, columns: Sequence[Sequence[Any]]) -> None:
        """Insert the rows given as one sequence per column of `COLUMNS` (the cost as text)."""
        narrow = _fits_int32(columns)
        n = len(columns[_ID])
        kinds = tuple(_column_kind(column, n) for column in columns) if n else (_NULL,) * len(columns)
        appender, insert = self._plan(narrow, kinds)
        parameters = [column[0] for column, how in zip(columns, kinds, strict=True) if how == _CONSTANT]
        if appender is not None:
            try:
                appender.append_rows(zip(*[column for column, how in zip(columns, kinds, strict=True) if how == _APPEND]))
                appender.flush()
            except BaseException:
                appender.clear()  # the rows before a refused one: the batch is refused whole
                raise
        else:
            parameters.append(n)  # an empty batch (a probe) runs the INSERT too, for no row
        self.con.execute(insert, parameters)
        if appender is not None:
            self.con.execute(self.empty[narrow])


class _Migrating:
    """A DuckDB connection as the migration runner sees it."""

    dialect = "duckdb"

    def __init__(self, con: Any) -> None:
        self.con = con

    def execute(self, sql: str, *params: Any) -> None:
        self.con.execute(sql, list(params))

    def column(self, sql: str, *params: Any) -> list[Any]:
        return [row[0] for row in self.con.execute(sql, list(params)).fetchall()]


def _check_is_meter_ledger(con: Any, path: str) -> None:
    """A DuckDB file with a `requests` table meter did not make is someone else's data."""
    columns = {row[0] for row in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'").fetchall()}
    if columns and not {"id", "started_at", "finished_at", "endpoint"} <= columns:
        raise LedgerUnusable(f"ledger {path} is not a meter ledger (it has a requests table meter did not make)")


def read_only_statement(con: Any, sql: str) -> None:
    """Readers run one SELECT, never anything that changes the ledger (as on PostgreSQL,
    where reads run in a read-only transaction)."""
    import duckdb

    statements = con.extract_statements(sql)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ValueError("a ledger query is one read-only SELECT statement")


def quiet_cursor(con: Any) -> Any:
    """A cursor (a connection of its own) that draws no progress bar: DuckDB draws one
    on stdout for a long query, into the middle of a report's output."""
    import duckdb

    cur = con.cursor()
    try:
        cur.execute("SET enable_progress_bar = false")
    except duckdb.InvalidInputException:
        # A locked configuration (the serving ledger, `sql.confine_duckdb`): off a
        # terminal a cursor draws no progress bar anyway; say so if it would.
        (drawn,) = cur.execute("SELECT current_setting('enable_progress_bar')").fetchone() or (False,)
        if drawn:
            cur.close()
            raise
    return cur


class CostUpdate:
    """`set_costs` step by step, in one transaction on a cursor of its own (the ledger
    child drives it one message at a time): each chunk is one UPDATE joined to it as an
    Arrow table, so the join's hash table is the size of a chunk (one join of every
    change at the end took 418 MiB at 1M rows against 257 MiB at 200k).  What still
    grows is DuckDB's own undo of the updated rows, about 120 bytes each, held until
    the one commit: the price of a reprice that is all or nothing (a memory_limit does
    not bound it; committing per chunk would, at the cost of a half-repriced ledger
    when it fails).  scripts/bench_reprice.py measures it."""

    def __init__(self, con: Any) -> None:
        self.con = quiet_cursor(con)
        self.con.execute("BEGIN TRANSACTION")
        self.updated = 0

    def add(self, changes: Sequence[tuple[str, Decimal | None]]) -> None:
        import pyarrow as pa

        chunk = pa.table(
            {
                "id": pa.array([c[0] for c in changes], type=pa.string()),
                "cost_usd": pa.array([c[1] for c in changes], type=pa.decimal128(18, 9)),
            }
        )
        self.con.register("meter_costs_chunk", chunk)
        try:
            (updated,) = self.con.execute(
                "UPDATE requests SET cost_usd = c.cost_usd FROM meter_costs_chunk AS c WHERE requests.id = c.id::UUID"
            ).fetchone()
        finally:
            self.con.unregister("meter_costs_chunk")
        self.updated += int(updated)

    def commit(self) -> int:
        """Commit the updates; the number of rows updated."""
        try:
            self.con.execute("COMMIT")
        except BaseException:
            self.abort()
            raise
        self.con.close()
        return self.updated

    def abort(self) -> None:
        try:
            self.con.execute("ROLLBACK")
        finally:
            self.con.close()


class DuckDBStore:
    dialect = "duckdb"
    sanitises = False  # the writer sanitises what it is given
    cost_chunk_rows = COST_CHUNK_ROWS  # changes `set_costs` holds at a time

    def __init__(self, path: str, settings: Mapping[str, str | int | bool] | None = None) -> None:
        self.path = path
        self.con: Any = None
        # One DuckDB worker thread: batches are small and frequent, and on a small
        # machine more threads only compete with the event loop for cores.  The
        # ledger process adds its memory bounds (`child_store.LEDGER_PROCESS_SETTINGS`).
        self.settings: dict[str, str | bool | int | float | list[str]] = {"threads": 1, **(settings or {})}
        self._staging: _Staging | None = None  # made at the first write, on `con`
        # The file opened, as (device, inode): see `_check_same_file`.  None for a store
        # over a connection made elsewhere or in memory.
        self._file: tuple[int, int] | None = None
        # Which rows the ledger may have already (`_new_rows`): the ids and newest start
        # of the last batches written, and an upper bound of every other row's
        # started_at (epoch seconds); None: not known, asked at the next write.
        self._recent: collections.deque[tuple[frozenset[str], float]] = collections.deque()
        self._settled: float | None = None
        # Idempotent by id without an index: a retried batch finds its rows among
        # those started no earlier than the batch's first record, which DuckDB's
        # zone maps on started_at narrow to the newest row groups.  A query of its
        # own, not a NOT EXISTS in the INSERT: DuckDB would unnest every column of
        # the batch twice, for the join and for the rows, at half the ingest rate.
        # The batch's own id strings come back, so they match whatever their case.
        self._present = (
            "SELECT b.id FROM (SELECT UNNEST(?::VARCHAR[]) AS id) AS b "
            "WHERE b.id::UUID IN (SELECT id FROM requests WHERE started_at >= to_timestamp(?))"
        )

    @classmethod
    def over(cls, con: Any, path: str) -> DuckDBStore:
        """A store over a connection made elsewhere (the readers' attached files); open already."""
        store = cls(path)
        store.con = con
        return store

    def open(self) -> None:
        import duckdb

        created = False
        if self.path != ":memory:":
            check_directory(self.path, "ledger")  # never created: a typo must not make a tree
            created = not os.path.exists(self.path)
        self.con = self._connect()
        self._file = _file_identity(self.path) if self.path != ":memory:" else None
        if created:
            # The ledger child sets a umask so DuckDB creates its files 0600; in any
            # other process the new file is narrowed here.  An existing file keeps the
            # mode its operator gave it.
            os.chmod(self.path, 0o600)
        try:
            _check_is_meter_ledger(self.con, self.path)
            migrate(_Migrating(self.con), self.path)
        except duckdb.Error as exc:
            self.close()
            damaged = _damaged(self.path, exc)
            if damaged is None:
                raise
            raise damaged from None
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        """The DuckDB connection; while the ledger process of a `meter serve` that was
        killed (SIGKILL: the OOM killer, a `kill -9`) still holds the file, ending its
        last write, waited for up to `ORPHAN_WAIT`, then ended: a restart at once (a
        supervisor that restarts only the process, an operator's `kill -9` then start)
        would otherwise fail start-up with "in use", and one after a leftover that
        hangs, for good.  Any other holder fails at once, as start-up must."""
        import duckdb

        deadline: float | None = None
        ended = False
        while True:
            try:
                return duckdb.connect(self.path, config=self.settings)
            except duckdb.Error as exc:
                orphan = orphaned_ledger_process(str(exc))
                if orphan is None:
                    raise unusable_from_duckdb(self.path, exc) from None
                holder = lock_holder(orphan)
                if deadline is None:
                    deadline = time.monotonic() + ORPHAN_WAIT
                    log.warning("ledger %s is still held by %s; waiting up to %.0fs for it to let go", self.path, holder, ORPHAN_WAIT)
                if time.monotonic() >= deadline:
                    if ended:  # it outlived a SIGKILL: stuck in the kernel (a dead network disk)
                        raise LedgerUnusable(f"ledger {self.path} is in use by {holder}, which did not let go even when killed") from None
                    # Hung: it would hold the ledger from every later start for good.  What
                    # it was given is its meter's (spooled at a shutdown that gave up on
                    # it, or gone with a meter that was killed): ending it costs nothing more.
                    log.warning("%s did not let go of ledger %s within %.0fs: ending it", holder, self.path, ORPHAN_WAIT)
                    _end_orphan(orphan)
                    ended, deadline = True, time.monotonic() + ORPHAN_END_WAIT
                time.sleep(0.05)

    def probe(self) -> None:
        """An empty batch through the whole write path: succeeds while the store works."""
        self.write([])

    def write(self, records: Sequence[Record]) -> None:
        def claimed_columns(con: Any) -> list[list[Any]]:
            self._claim_usage(con, records)  # may clear usage claimed before: read the columns after it
            columns = [list(map(getter, records)) for getter in _COLUMN_GETTERS]
            columns[_COST] = [None if cost is None else str(cost) for cost in columns[_COST]]  # staged as text
            return columns

        self._write_batch(claimed_columns)

    def write_columns(self, columns: Sequence[Sequence[Any]]) -> None:
        """`write` for a sanitised batch given as one sequence per column of `COLUMNS`,
        the cost as the text of its Decimal, none of whose rows needs a usage claim (no
        background response: `schema.needs_claim`).  The ledger process's usual batch
        (`rows.decode_columns`), with no `Record` made per row.  The columns are taken
        (a list given is left empty), so that nothing holds the batch's values through
        the commit and its checkpoint, the ledger process's peak of memory."""
        taken = [list(columns)]
        if isinstance(columns, list):
            columns.clear()
        self._write_batch(lambda con: taken.pop())

    def _write_batch(self, prepare: Callable[[Any], Sequence[Sequence[Any]]]) -> None:
        """One batch in one transaction: `prepare`, inside it, gives its columns, and the
        rows the ledger does not have yet go in."""
        con = self._staged_con()
        con.execute("BEGIN TRANSACTION")
        try:
            columns = prepare(con)
            self._insert_new(con, columns)
            seen = (frozenset(columns[_ID]), max(columns[_STARTED_AT], default=0.0))
            del columns  # the batch's values are DuckDB's now: not held through the commit's checkpoint
            self._check_same_file()
            con.execute("COMMIT")
        except Exception:
            self._settled = None  # whatever a failed COMMIT left, asked again
            with contextlib.suppress(Exception):  # the store's own reason, below, is the one to raise
                con.execute("ROLLBACK")
            raise
        self._saw(*seen)

    def _check_same_file(self) -> None:
        """The file at the ledger's path is still the one open: a ledger deleted (by
        mistake) or moved aside (a rotation by `mv`) stays open, and every batch
        committed to it afterwards would be lost with it or land in the wrong file,
        with nothing said.  An outage instead: the writer closes this file and opens
        the one at the path (a new ledger if there is none), and the batch goes there."""
        if self._file is not None and _file_identity(self.path) != self._file:
            raise LedgerFileGone(
                f"the ledger file {self.path} was deleted or replaced while meter had it open; "
                "its records go to the file now at that path (a new ledger if there is none)"
            )

    @staticmethod
    def _claim_usage(con: Any, records: Sequence[Record]) -> None:
        """Claim the usage of the background responses in `records` (`schema.claim_usage`)."""
        candidates = sorted({r.response_id for r in records if r.response_id is not None and needs_claim(r)})
        already: set[str] = set()
        if candidates:
            rows = con.execute("SELECT response_id FROM usage_claims WHERE response_id IN (SELECT UNNEST(?::VARCHAR[]))", [candidates]).fetchall()
            already = {row[0] for row in rows}
        claims = claim_usage(records, already)
        if claims:
            con.execute(
                "INSERT INTO usage_claims (response_id, request_id) SELECT UNNEST(?::VARCHAR[]), UNNEST(?::UUID[]) ON CONFLICT DO NOTHING",
                [[c[0] for c in claims], [c[1] for c in claims]],
            )

    def _staged_con(self) -> Any:
        """The connection, with its staging tables made (outside any transaction: one
        made inside a batch that failed would be rolled back with it)."""
        con = self._open_con()
        if self._staging is None and can_append(con):
            self._staging = _Staging(con)
        return con

    def _insert_new(self, con: Any, columns: Sequence[Sequence[Any]]) -> None:
        """Insert the rows whose ids the ledger does not have yet."""
        keep = self._new_rows(con, columns[_ID], columns[_STARTED_AT])
        if keep is not None:
            columns = [[column[i] for i in keep] for column in columns]
        if self._staging is not None:
            self._staging.insert(columns)
            return
        n = len(columns[_ID])
        for start in range(0, max(n, 1), ROWS_PER_STATEMENT):  # an empty batch (a probe) runs once
            given, lists = _given_lists([column[start : start + ROWS_PER_STATEMENT] for column in columns])
            con.execute(_insert_sql(given), lists)

    def _new_rows(self, con: Any, ids: Sequence[str], started: Sequence[float]) -> list[int] | None:
        """The indexes of the rows the ledger does not have yet; None for all of them.

        A retried batch or a replayed spool may hold rows the ledger has.  Those can
        only be among the last batches this store wrote (`_recent`, compared in memory)
        or have started no later than `_settled`, the newest start of every other row:
        only the batch's rows that started that early are looked up in the ledger.  A
        lookup of every id cost ~1.5 us a row, and under steady traffic no row of a
        batch starts that early (requests overlap the last batches, not older ones)."""
        if self._settled is None:
            ((newest,),) = con.execute("SELECT epoch(max(started_at)) FROM requests").fetchall()
            self._settled = -math.inf if newest is None else float(newest)
            self._recent.clear()
        horizon = self._settled + 0.001  # stored to the microsecond: a margin well past rounding
        present: set[str] = set()
        if started and min(started) <= horizon:
            old = [i for i, at in enumerate(started) if at <= horizon]
            ask = [ids[i] for i in old]
            present.update(row[0] for row in con.execute(self._present, [ask, min(started[i] for i in old)]).fetchall())
        for seen, _ in self._recent:
            if not seen.isdisjoint(ids):
                present.update(seen.intersection(ids))
        if len(set(ids)) < len(ids):
            # A record twice in one batch (a spool replayed, then spooled again whole at
            # a shutdown while the store was down): its first row only.
            keep = []
            for i, id_ in enumerate(ids):
                if id_ not in present:
                    present.add(id_)
                    keep.append(i)
            return keep
        if not present:
            return None
        return [i for i, id_ in enumerate(ids) if id_ not in present]

    def _saw(self, ids: frozenset[str], newest: float) -> None:
        """After a commit: the batch's ids and newest start join `_recent`, and the oldest
        of those leaves it for `_settled` (see `_new_rows`)."""
        if not ids or self._settled is None:
            return
        self._recent.append((ids, newest))
        if len(self._recent) > RECENT_BATCHES:
            self._settled = max(self._settled, self._recent.popleft()[1])

    # reads ----------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        cur = quiet_cursor(self._open_con())
        try:
            read_only_statement(cur, sql)
            res = cur.execute(sql, list(params))
            return [d[0] for d in res.description], res.fetchall()
        finally:
            cur.close()

    def iter_query(self, sql: str, params: Sequence[Any] = (), *, batch_rows: int = 50_000) -> Generator[list[tuple[Any, ...]], None, None]:
        cur = quiet_cursor(self._open_con())
        try:
            read_only_statement(cur, sql)
            res = cur.execute(sql, list(params))  # a streaming result: rows are made as they are fetched
            while batch := res.fetchmany(batch_rows):
                yield batch
        finally:
            cur.close()

    def set_costs(self, changes: Iterable[tuple[str, Decimal | None]]) -> int:
        update = self.begin_costs()
        try:
            for chunk in chunks(changes, self.cost_chunk_rows):
                update.add(chunk)
        except BaseException:
            update.abort()
            raise
        return update.commit()

    def begin_costs(self) -> CostUpdate:
        return CostUpdate(self._open_con())

    def prune(self, before: datetime) -> Pruned:
        """Delete what is older than `before` (`prune`) in one transaction on a cursor of
        its own, then checkpoint; `prune.compact` shrinks the file."""
        cur = quiet_cursor(self._open_con())
        try:
            present = {row[0] for row in cur.execute(PRESENT_TABLES_SQL).fetchall()}
            deleted: dict[str, int] = {}
            cur.execute("BEGIN TRANSACTION")
            try:
                for table, sql, params in statements(before, present):
                    row = cur.execute(sql, params).fetchone()
                    deleted[table] = int(row[0]) if row else 0
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):  # the statement's own error is the one to raise
                    cur.execute("ROLLBACK")
                raise
            cur.execute("CHECKPOINT")
            return tally(deleted)
        finally:
            cur.close()

    # alert claims: each statement on a cursor of its own, never inside the writer's transaction

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur = quiet_cursor(self._open_con())
        try:
            return cur.execute(sql, list(params)).fetchall()
        finally:
            cur.close()

    def claim_alert(self, alert: AlertClaim, owner: str, lease_until: datetime) -> bool:
        return alert_claims.claim(self._run, alert, owner, lease_until)

    def update_alert(self, alert: AlertClaim, owner: str, lease_until: datetime | None, sent: bool) -> bool:
        return alert_claims.update(self._run, alert, owner, lease_until, sent)

    def take_alerts(self, owner: str, now: datetime, lease_until: datetime) -> list[AlertClaim]:
        return alert_claims.take(self._run, owner, now, lease_until)

    def close(self) -> None:
        self._staging = None
        self._settled = None
        if self.con is not None:
            self.con.close()
            self.con = None

    def _open_con(self) -> Any:
        con = self.con
        if con is None:
            raise LedgerNotOpen(f"the ledger {self.path} is not open")
        return con


class LedgerFileGone(LedgerUnavailable):
    """The file at the ledger's path is no longer the one the store has open."""


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_LOCK_PID = re.compile(r"Conflicting lock is held in .*?\(PID (\d+)\)")


# Seconds a ledger held by the ledger process of a killed `meter serve` is waited for
# at open.  That process ends its last write, sees its socket closed and closes the
# file: measured 1.5-4 s with the restarted meter starting beside it (it runs under
# SCHED_IDLE, so gets the CPU last); a checkpoint of a full WAL may add seconds.
ORPHAN_WAIT = 30.0
ORPHAN_END_WAIT = 5.0  # then, once it is sent SIGKILL, for the kernel to release the file


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _started_by(cmdline: list[bytes]) -> int | None:
    """The `--parent` a ledger process was started with (`ChildProcessStore.open`)."""
    try:
        return int(cmdline[cmdline.index(b"--parent") + 1])
    except (ValueError, IndexError):
        return None  # started by an older meter


def lock_holder(pid: int) -> str:
    """Who holds a ledger: DuckDB names the process with the file open, which for
    meter is the ledger child of another `meter serve`; name that `meter serve`, or
    say that it has ended (the child, reparented, outlives it for a moment)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"meter.ledger" in cmdline:
            started_by = _started_by(cmdline)
            if started_by is not None and started_by != _parent_of(pid):
                return f"the ledger process (pid {pid}) of a meter serve that has ended (pid {started_by})"
            return f"meter serve (pid {_parent_of(pid)})"
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        return f"{name} (pid {pid})"
    except (OSError, ValueError, IndexError):
        return f"process {pid}"


def orphaned_ledger_process(text: str) -> int | None:
    """The pid holding the file, when DuckDB's error `text` is a lock held by the ledger
    process of a `meter serve` that has ended (its parent is no longer the one that
    started it); else None."""
    held = _LOCK_PID.search(text)
    if held is None:
        return None
    pid = int(held.group(1))
    return pid if _is_orphaned_ledger_process(pid) else None


def _is_orphaned_ledger_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        started_by = _started_by(cmdline) if b"meter.ledger" in cmdline else None
        return started_by is not None and started_by != _parent_of(pid)
    except (OSError, ValueError, IndexError):
        return False  # gone meanwhile: the next try opens the file


def _end_orphan(pid: int) -> None:
    """SIGKILL the leftover ledger process `pid`, through a pidfd taken before it is
    checked once more: the pid may have ended and been reused since it was found, and
    a pidfd's signal never reaches a process that merely took its number."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone meanwhile
    try:
        if _is_orphaned_ledger_process(pid):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def holder_named(text: str) -> str | None:
    """Who holds the file, as `lock_holder` names it, when DuckDB's error `text` is a
    lock held by another process; else None."""
    held = _LOCK_PID.search(text)
    return lock_holder(int(held.group(1))) if held else None


# DuckDB's words for a file it cannot read back: cut short, or a block whose checksum
# fails.  Neither goes away by waiting; the file needs a person (a backup, or moving
# it aside for a new ledger).
_DAMAGE = ("Corrupt database file", "Could not read enough bytes")


def _damaged(path: str, exc: Exception) -> LedgerUnusable | None:
    """The one line for a ledger file DuckDB cannot read back; None for any other error."""
    text = str(exc)
    if not any(words in text for words in _DAMAGE):
        return None
    first = text.splitlines()[0].removeprefix("IO Error: ") if text else type(exc).__name__
    return LedgerUnusable(f"ledger {path} is damaged ({first}); restore it from a backup, or move it aside to start a new one")


def unusable_from_duckdb(path: str, exc: Exception) -> Exception:
    """DuckDB's open error as start-up's one line, or as is if it is not about the file."""
    text = str(exc)
    holder = holder_named(text)
    if holder is not None:
        return LedgerUnusable(f"ledger {path} is in use by {holder}")
    damaged = _damaged(path, exc)
    if damaged is not None:
        return damaged
    if "not a valid DuckDB database file" in text:
        return LedgerUnusable(f"ledger {path} is not a DuckDB database (not a meter ledger)")
    if "No such file or directory" in text or "Permission denied" in text or "Is a directory" in text:
        return LedgerUnusable(f"ledger {path}: {text.removeprefix('IO Error: ')}")
    return exc
