"""The PostgreSQL store: every replica writes to one database (SPEC §4, "Many replicas").

- Schema: the migration runner's steps, applied under an advisory lock when the
  writer's connection opens (every new connection checks, so a database
  restored empty heals itself).
- One transaction per batch.  The rows whose usage must count once (see
  `schema.claim_usage`) claim their response id in `usage_claims` with
  `INSERT ... ON CONFLICT DO NOTHING RETURNING`: an id whose claim is not
  returned was counted by another row (an earlier batch, or another replica at
  the same moment), so the row keeps its place but not its usage.  Rows go in
  by binary COPY into a temporary table, then `INSERT ... ON CONFLICT (id) DO
  NOTHING`: a batch retried after a timeout that had in fact committed adds
  nothing.
- A batch PostgreSQL refuses for its values raises `PostgresRefused` (the
  writer isolates the refused records); anything else is an outage
  (`PostgresLedgerError`: the writer keeps the batch and retries).
- Reads never share the writer's connection, so a long report never holds up
  the writer: `query` has a connection of its own; `iter_query` (a server-side
  cursor in a read-only transaction) and `set_costs` (COPY into a temporary
  table, then one UPDATE join, in one transaction) each open one for the call,
  which lets a `set_costs` be fed by an `iter_query` of the same store.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from ..record import COLUMNS, Record
from . import alert_claims
from .alert_claims import AlertClaim
from .migrations import migrate
from .postgres_session import PostgresLedgerError, PostgresRefused, PostgresSession
from .prune import PRESENT_TABLES_SQL, Pruned, statements, tally
from .schema import COLUMN_TYPES, SQL_TYPES, claim_usage, select_from_batch
from .store import COST_CHUNK_ROWS, chunks

# The batch goes by binary COPY into this per-session table, as the record holds
# it (epoch seconds, JSON text), and is converted on the way into `requests` as
# DuckDB converts its staged batch (`select_from_batch`).
_STAGE_TYPES = {**SQL_TYPES["postgresql"], "TIMESTAMPTZ": "double precision", "JSON": "text"}
_STAGE = "meter_batch"
_CREATE_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ("
    + ", ".join(f"{name} {_STAGE_TYPES[kind]}" for name, kind in COLUMN_TYPES.items())
    + ") ON COMMIT DELETE ROWS"
)


_INSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) "
    f"SELECT {select_from_batch('postgresql')} FROM {_STAGE} "
    "ON CONFLICT (id) DO NOTHING"
)
_CLAIM = (
    "INSERT INTO usage_claims (response_id, request_id) "
    "SELECT * FROM unnest($1::text[], $2::uuid[]) "
    "ON CONFLICT DO NOTHING RETURNING response_id"
)
_row = operator.attrgetter(*COLUMNS)


def _is_data_error(exc: BaseException) -> bool:
    """The batch's values, not the server: data exceptions (class 22), integrity
    violations (class 23), or a value the driver could not encode."""
    import asyncpg

    if isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return False
    return isinstance(exc, (UnicodeError, OverflowError, ValueError, TypeError)) and not isinstance(exc, OSError)


class _Migrating:
    """An asyncpg connection as the migration runner sees it."""

    dialect = "postgresql"

    def __init__(self, session: PostgresSession, con: Any) -> None:
        self.session = session
        self.con = con

    def execute(self, sql: str, *params: Any) -> None:
        self.session.wait(self.con.execute(sql, *params))

    def column(self, sql: str, *params: Any) -> list[Any]:
        return [row[0] for row in self.session.wait(self.con.fetch(sql, *params))]


async def _connected(con: Any) -> None:
    """Nothing: `run` has connected (and set up) the session."""


class PostgresStore:
    """A `Store` on PostgreSQL.  Thread-safe; blocking."""

    dialect = "postgresql"
    sanitises = False  # the writer sanitises what it is given
    cost_chunk_rows = COST_CHUNK_ROWS  # changes `set_costs` holds at a time

    def __init__(self, url: str, *, migrate: bool = True, connect_timeout: float = 5.0, command_timeout: float = 60.0) -> None:
        self.url = url
        self.migrate = migrate
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._writer = self._session(command_timeout, on_connect=self._prepare_writer)
        self._reader = self._session(command_timeout)
        self._alerts = self._session(command_timeout)
        self.safe_url = self._writer.safe_url

    def _session(self, command_timeout: float | None, on_connect: Callable[[PostgresSession, Any], None] | None = None) -> PostgresSession:
        return PostgresSession(self.url, connect_timeout=self.connect_timeout, command_timeout=command_timeout, on_connect=on_connect)

    def _prepare_writer(self, session: PostgresSession, con: Any) -> None:
        """Every new writer connection: the schema up to date, the staging table there."""
        if self.migrate:
            migrate(_Migrating(session, con), self.safe_url)
        session.wait(con.execute(_CREATE_STAGE))

    # writes ---------------------------------------------------------------------

    def open(self) -> None:
        """Connect and bring the schema up to date (raises if the database is unreachable)."""
        self._writer.run(_connected, "open")

    def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        try:
            self._writer.run(lambda con: self._write(con, records), "write")
        except PostgresLedgerError as exc:
            cause = exc.__cause__
            if cause is not None and _is_data_error(cause):
                raise PostgresRefused(str(exc)) from cause
            raise

    def probe(self) -> None:
        """A round trip that must succeed while the server works (see `LedgerWriter`)."""
        self._writer.run(lambda con: con.fetchval("SELECT 1"), "probe")

    async def _write(self, con: Any, records: Sequence[Record]) -> None:
        # Within the batch the first row of a response id keeps its usage ...
        claims = sorted(claim_usage(records, set()))  # sorted: replicas take row locks in one order
        async with con.transaction():
            if claims:
                # ... and across batches and replicas, the row whose claim lands first.
                won = {row[0] for row in await con.fetch(_CLAIM, [c[0] for c in claims], [c[1] for c in claims])}
                if len(won) < len(claims):
                    lost = {request_id for response_id, request_id in claims if response_id not in won}
                    for record in records:
                        if record.id in lost:
                            record.clear_usage()
            await con.copy_records_to_table(_STAGE, records=[_row(r) for r in records], columns=COLUMNS, timeout=self.command_timeout)
            await con.execute(_INSERT)

    # reads ----------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        """One statement in a read-only transaction (a report cannot change the ledger by
        mistake).  Types as DuckDB gives them: uuid.UUID, aware datetime, Decimal, JSON as text."""
        return self._reader.run(lambda con: _query(con, sql, list(params)), "query", again_if_lost=True)

    def iter_query(self, sql: str, params: Sequence[Any] = (), *, batch_rows: int = 50_000) -> Iterator[list[tuple[Any, ...]]]:
        session = self._session(self.command_timeout)
        try:
            cursor = session.run(lambda con: _open_cursor(con, sql, list(params)), "query")
            while batch := session.run(lambda con: cursor.fetch(batch_rows), "query"):
                yield [tuple(row) for row in batch]
        finally:
            session.close()  # ends the transaction and its cursor

    def set_costs(self, changes: Iterable[tuple[str, Decimal | None]]) -> int:
        # No command timeout: the one UPDATE of a large reprice may take minutes.
        session = self._session(command_timeout=None)
        try:
            transaction = session.run(_begin_costs, "update")
            for chunk in chunks(changes, self.cost_chunk_rows):
                session.run(lambda con: con.copy_records_to_table("meter_costs", records=chunk, columns=("id", "cost_usd")), "update")  # noqa: B023 - run awaits it at once
            status = session.run(lambda con: con.execute("UPDATE requests SET cost_usd = c.cost_usd FROM meter_costs AS c WHERE requests.id = c.id"), "update")
            session.run(lambda con: transaction.commit(), "update")
            return int(status.rsplit(" ", 1)[1])  # "UPDATE n"
        finally:
            session.close()  # without the commit, closing rolls back

    def prune(self, before: datetime) -> Pruned:
        """The DELETEs of `prune` in one transaction, live (rows being written are newer),
        then VACUUM (ANALYZE) so the space is reused and the planner knows the new size."""
        session = self._session(command_timeout=None)  # one DELETE of millions of rows may take minutes
        try:
            deleted = session.run(lambda con: _prune(con, before), "prune")
            for table in ("requests", "usage_claims"):
                session.run(lambda con: con.execute(f"VACUUM (ANALYZE) {table}"), "vacuum")  # noqa: B023 - run awaits it at once
            return tally(deleted)
        finally:
            session.close()

    # alert claims: a session of their own, so a claim never waits behind a batch or a report

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._alerts.run(lambda con: _fetch(con, sql, list(params)), "alert claim")

    def claim_alert(self, alert: AlertClaim, owner: str, lease_until: datetime) -> bool:
        return alert_claims.claim(self._run, alert, owner, lease_until)

    def update_alert(self, alert: AlertClaim, owner: str, lease_until: datetime | None, sent: bool) -> bool:
        return alert_claims.update(self._run, alert, owner, lease_until, sent)

    def take_alerts(self, owner: str, now: datetime, lease_until: datetime) -> list[AlertClaim]:
        return alert_claims.take(self._run, owner, now, lease_until)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
        self._alerts.close()


async def _fetch(con: Any, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await con.fetch(sql, *params)]


async def _query(con: Any, sql: str, params: list[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    async with con.transaction(readonly=True):
        stmt = await con.prepare(sql)
        rows = await stmt.fetch(*params)
        names = [attr.name for attr in stmt.get_attributes()]
    return names, [tuple(row) for row in rows]


async def _open_cursor(con: Any, sql: str, params: list[Any]) -> Any:
    """A server-side cursor in a read-only transaction left open for the fetches."""
    await con.transaction(readonly=True).start()
    stmt = await con.prepare(sql)
    return await stmt.cursor(*params)


async def _prune(con: Any, before: datetime) -> dict[str, int]:
    present = {row[0] for row in await con.fetch(PRESENT_TABLES_SQL)}
    deleted: dict[str, int] = {}
    async with con.transaction():
        for table, sql, params in statements(before, present):
            status = await con.execute(sql, *params)
            deleted[table] = int(status.rsplit(" ", 1)[1])  # "DELETE n"
    return deleted


async def _begin_costs(con: Any) -> Any:
    transaction = con.transaction()
    await transaction.start()
    await con.execute("CREATE TEMPORARY TABLE meter_costs (id uuid, cost_usd numeric(18,9)) ON COMMIT DROP")
    return transaction
