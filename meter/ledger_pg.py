"""The PostgreSQL ledger: every replica writes to one database (SPEC §4, "Many replicas").

`PostgresStore` is a `Store` for the `LedgerWriter`'s thread.  It drives asyncpg on
an event loop of its own (the writer thread calls plain methods; each runs one
coroutine to completion there), so the proxy's event loop never waits on it.

- Schema: the same append-only list of named steps as the DuckDB ledger, in
  PostgreSQL types, applied under an advisory lock so that replicas starting
  together migrate once.
- One transaction per batch.  The rows whose usage must count once (see
  `meter.ledger.claim_usage`) claim their response id in `usage_claims` with
  `INSERT ... ON CONFLICT DO NOTHING RETURNING`: an id whose claim is not
  returned was counted by another row (an earlier batch, or another replica at
  the same moment), so the row keeps its place but not its usage.  Rows go in
  by binary COPY into a temporary table, then `INSERT ... ON CONFLICT (id) DO
  NOTHING`: a batch retried after a timeout that had in fact committed adds
  nothing.
- Any failure drops the connection and raises; the next write connects afresh.
  Values PostgreSQL cannot store (NUL in text, lone surrogates, numbers past the
  column types) never get here: the writer passes every batch through
  `meter.sanitise`, the one step every store shares.  A batch PostgreSQL still
  refuses for its values raises `LedgerRefused` (the writer isolates the
  refused records); anything else is an outage (the writer keeps the batch and
  retries).  Messages never carry the password (`redact_url`).
- Readers (`meter report`, `/api/report`, `meter reprice`) use `query()` and
  `execute_many()`, with `$1`-style parameters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import operator
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .config import redact_url
from .ledger import COLUMN_TYPES, LedgerRefused, claim_usage
from .record import COLUMNS, Record

log = logging.getLogger("meter.ledger")

PG_TYPES = {
    "UUID": "uuid",
    "TIMESTAMPTZ": "timestamptz",
    "VARCHAR": "text",
    "JSON": "jsonb",
    "DECIMAL(18,9)": "numeric(18,9)",
    "DOUBLE": "double precision",
    "BIGINT": "bigint",
    "INTEGER": "integer",
    "BOOLEAN": "boolean",
}

# pg_advisory_lock key that serialises migrations between replicas ("meter" in ASCII).
MIGRATION_LOCK = 0x6D65746572


class PostgresLedgerError(RuntimeError):
    """A PostgreSQL ledger operation failed; the message is safe to log (no password).

    An outage for the writer (`kind`): the server is gone, or refuses the session
    (a lost schema, missing rights), whatever the records; `PostgresRefused` is the
    case where the values are the problem.
    """

    kind = "outage"


class PostgresRefused(PostgresLedgerError, LedgerRefused):
    """PostgreSQL refused the batch for its values (SQLSTATE class 22 or 23, or a value
    the driver cannot encode); the server itself is working."""


# --- migrations ----------------------------------------------------------------
# Append-only, named like the DuckDB steps in meter.ledger.MIGRATIONS (the same
# names, in the same order), each applied once and recorded in `_meter_migrations`.


async def _m001_requests(con: Any) -> None:
    columns = ",\n  ".join(f"{name} {PG_TYPES[kind]}" + (" PRIMARY KEY" if name == "id" else "") for name, kind in COLUMN_TYPES.items())
    await con.execute(f"CREATE TABLE IF NOT EXISTS requests (\n  {columns}\n)")
    await con.execute("CREATE INDEX IF NOT EXISTS requests_started_at ON requests (started_at)")


async def _m002_usage_claims(con: Any) -> None:
    await con.execute("CREATE TABLE IF NOT EXISTS usage_claims (response_id text PRIMARY KEY, request_id uuid, claimed_at timestamptz DEFAULT now())")
    # Usage of background responses already in the ledger is claimed by its
    # earliest row, so that a retrieve after the upgrade does not count it again.
    await con.execute(
        "INSERT INTO usage_claims (response_id, request_id, claimed_at) "
        "SELECT DISTINCT ON (response_id) response_id, id, started_at FROM requests "
        "WHERE (input_tokens IS NOT NULL OR output_tokens IS NOT NULL OR total_tokens IS NOT NULL) "
        "AND response_id IN (SELECT response_id FROM requests WHERE background) "
        "ORDER BY response_id, started_at, id "
        "ON CONFLICT DO NOTHING"
    )


MIGRATIONS: list[tuple[str, Callable[[Any], Awaitable[None]]]] = [
    ("m001_requests", _m001_requests),
    ("m002_usage_claims", _m002_usage_claims),
]


async def migrate(con: Any) -> list[str]:
    """Apply the steps not yet recorded, holding the migration lock; returns their names."""
    await con.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        # DDL only when something is missing: a role without CREATE rights can run a migrated ledger.
        if await con.fetchval("SELECT to_regclass('_meter_migrations')") is None:
            await con.execute("CREATE TABLE IF NOT EXISTS _meter_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row[0] for row in await con.fetch("SELECT name FROM _meter_migrations")}
        applied = []
        for name, step in MIGRATIONS:
            if name in done:
                continue
            async with con.transaction():
                await step(con)
                await con.execute("INSERT INTO _meter_migrations (name) VALUES ($1)", name)
            applied.append(name)
        unknown = done - {name for name, _ in MIGRATIONS}
        if unknown:
            log.warning("the ledger has migrations this meter does not know (%s): a newer meter wrote it", ", ".join(sorted(unknown)))
        if applied or await con.fetchval("SELECT to_regclass('schema_version')") is None:
            await con.execute("CREATE OR REPLACE VIEW schema_version AS SELECT count(*) AS version, max(name) AS latest FROM _meter_migrations")
        return applied
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


# --- statements ----------------------------------------------------------------

# The batch goes by binary COPY into this per-session table, as the record holds
# it (epoch seconds, JSON text), and is converted on the way into `requests`.
_STAGE_TYPES = {**PG_TYPES, "TIMESTAMPTZ": "double precision", "JSON": "text"}
_STAGE = "meter_batch"
_CREATE_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ("
    + ", ".join(f"{name} {_STAGE_TYPES[kind]}" for name, kind in COLUMN_TYPES.items())
    + ") ON COMMIT DELETE ROWS"
)


def _from_stage(name: str, kind: str) -> str:
    if kind == "TIMESTAMPTZ":
        return f"to_timestamp({name})"
    if kind == "JSON":
        return f"{name}::jsonb"
    return name


_INSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(_from_stage(n, k) for n, k in COLUMN_TYPES.items())} FROM {_STAGE} "
    "ON CONFLICT (id) DO NOTHING"
)
_CLAIM = (
    "INSERT INTO usage_claims (response_id, request_id) "
    "SELECT * FROM unnest($1::text[], $2::uuid[]) "
    "ON CONFLICT DO NOTHING RETURNING response_id"
)
_row = operator.attrgetter(*COLUMNS)


# --- refusal or outage ------------------------------------------------------------


def _is_data_error(exc: BaseException) -> bool:
    """The batch's values, not the server: data exceptions (class 22), integrity
    violations (class 23), or a value the driver could not encode."""
    import asyncpg

    if isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return False
    return isinstance(exc, (UnicodeError, OverflowError, ValueError, TypeError)) and not isinstance(exc, OSError)


# --- the store -------------------------------------------------------------------


class PostgresStore:
    """A `Store` on PostgreSQL, plus `query()` for reports.  Thread-safe; blocking."""

    dialect = "postgresql"
    paramstyle = "numeric"  # $1, $2, ... (DuckDB accepts these too)

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        connect_timeout: float = 5.0,
        command_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.migrate = migrate
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._password = _password_of(url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._con: Any = None
        self._lock = threading.RLock()

    # Store protocol ------------------------------------------------------------

    def open(self) -> None:
        """Connect and bring the schema up to date (raises if the database is unreachable)."""
        with self._lock:
            self._call(self._connection, "open")

    def write(self, records: list[Record]) -> None:
        if not records:
            return
        with self._lock:
            try:
                self._call(lambda: self._write(records), "write")
            except PostgresLedgerError as exc:
                cause = exc.__cause__
                if cause is not None and _is_data_error(cause):
                    raise PostgresRefused(str(exc)) from cause
                raise

    def probe(self) -> None:
        """A round trip that must succeed while the server works (see `LedgerWriter`)."""
        with self._lock:
            self._call(self._probe, "probe")

    def close(self) -> None:
        if _loop_running_here():
            return _in_thread(self.close)
        with self._lock:
            loop, con = self._loop, self._con
            self._loop = self._con = None
            if loop is None:
                return
            try:
                if con is not None and not con.is_closed():
                    loop.run_until_complete(con.close(timeout=2))
            except Exception:  # noqa: BLE001 - closing politely failed; close hard
                con.terminate()  # type: ignore[union-attr]
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

    # reads ---------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = (), *, readonly: bool = True) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one statement ($1-style parameters); returns column names and rows.

        Read-only by default (a report cannot change the ledger by mistake).
        Types as DuckDB gives them: uuid.UUID, aware datetime, Decimal, JSON as text.
        """
        with self._lock:
            return self._call(lambda: self._query(sql, list(params), readonly), "query")

    def execute_many(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each argument tuple, in one transaction (e.g. `meter reprice`)."""
        with self._lock:
            self._call(lambda: self._execute_many(sql, [tuple(a) for a in args]), "update")

    def cursor(self) -> PostgresCursor:
        """A DB-API-like cursor (`execute`, `description`, `fetchall`), as DuckDB's store offers."""
        return PostgresCursor(self)

    # inside the store's loop ------------------------------------------------------

    def _call(self, make: Callable[[], Awaitable[Any]], what: str) -> Any:
        """Run one coroutine on the store's loop; failures drop the connection and raise a safe message."""
        if _loop_running_here():
            return _in_thread(self._call, make, what)
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        try:
            return self._loop.run_until_complete(make())
        except Exception as exc:  # noqa: BLE001 - every driver failure becomes one safe message
            self._drop()
            message = f"{what} on {self.safe_url} failed: {type(exc).__name__}: {exc}"
            if self._password:
                message = message.replace(self._password, "***")
            raise PostgresLedgerError(message) from _scrubbed(exc, self._password)

    def _drop(self) -> None:
        """Forget the connection after any failure; the next call connects afresh."""
        con, self._con = self._con, None
        if con is not None and not con.is_closed():
            con.terminate()

    async def _connection(self) -> Any:
        """The open connection, or a new one.  Every new connection checks the schema
        (cheap when nothing is missing), so a database restored empty heals itself."""
        if self._con is not None and not self._con.is_closed():
            return self._con
        import asyncpg

        con = await asyncpg.connect(
            self.url,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings={"application_name": "meter", "timezone": "UTC"},
        )
        try:
            if self.migrate:
                applied = await migrate(con)
                if applied:
                    log.info("ledger %s: applied %s", self.safe_url, ", ".join(applied))
            await con.execute(_CREATE_STAGE)
        except BaseException:
            con.terminate()
            raise
        self._con = con
        return con

    async def _write(self, records: list[Record]) -> None:
        con = await self._connection()
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

    async def _probe(self) -> None:
        con = await self._connection()
        await con.fetchval("SELECT 1")

    async def _query(self, sql: str, params: list[Any], readonly: bool) -> tuple[list[str], list[tuple[Any, ...]]]:
        con = await self._connection()
        async with con.transaction(readonly=readonly):
            stmt = await con.prepare(sql)
            rows = await stmt.fetch(*params)
            names = [attr.name for attr in stmt.get_attributes()]
        return names, [tuple(row) for row in rows]

    async def _execute_many(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        con = await self._connection()
        async with con.transaction():
            await con.executemany(sql, args)


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """For a caller on an event loop's thread (a test, an admin handler): the store's
    loop cannot run inside another, so run on a helper thread; the caller blocks, as
    it would on DuckDB's cursor."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meter-pg") as pool:
        return pool.submit(fn, *args).result()


def _password_of(url: str) -> str | None:
    from yarl import URL

    try:
        return URL(url).password or None
    except (ValueError, TypeError):
        return None


def _scrubbed(exc: BaseException, password: str | None) -> BaseException | None:
    """The cause to chain: the driver's own exception, unless its text holds the password."""
    if password and password in str(exc):
        return None
    return exc


_QMARK = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")


def qmark_to_numeric(sql: str) -> str:
    """`?` placeholders (outside quotes) to PostgreSQL's `$1, $2, ...`."""
    counter = iter(range(1, 1 << 30))
    return _QMARK.sub(lambda m: f"${next(counter)}" if m.group(0) == "?" else m.group(0), sql)


class PostgresCursor:
    """Just enough of DuckDB's cursor for readers: `execute(sql, params)`, `description`, `fetchall()`.

    Accepts `?` or `$n` placeholders.
    """

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.description: list[tuple[str, ...]] | None = None
        self._rows: list[tuple[Any, ...]] = []

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> PostgresCursor:
        names, self._rows = self.store.query(qmark_to_numeric(sql) if "?" in sql else sql, params or ())
        self.description = [(name,) for name in names]
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows, []
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop(0) if self._rows else None

    def close(self) -> None:
        self._rows = []
