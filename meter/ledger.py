"""The ledger sink: records leave the request path and land in the `requests` table.

`LedgerWriter` is an addon.  Its `done` hook only appends the record to a deque;
a writer thread wakes every `flush_interval` (or when a batch is full), turns the
batch into Arrow columns and inserts it in one statement, so the event loop never
waits on the database.  If the store fails, records wait in memory up to
`max_pending`; past that they go to a spool file (JSON lines) that is replayed
into the store at the next start.  Usage is counted once per response id: the
store keeps a `usage_claims` table, and a later row for a response already
claimed keeps its place in the ledger but not the usage.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from .record import COLUMNS, Record

log = logging.getLogger("meter.ledger")

# Column types of SPEC §4, shared by every store.
COLUMN_TYPES: dict[str, str] = {
    "id": "UUID",
    "started_at": "TIMESTAMPTZ",
    "finished_at": "TIMESTAMPTZ",
    "method": "VARCHAR",
    "path": "VARCHAR",
    "endpoint": "VARCHAR",
    "transport": "VARCHAR",
    "status_code": "INTEGER",
    "outcome": "VARCHAR",
    "stream": "BOOLEAN",
    "background": "BOOLEAN",
    "model_requested": "VARCHAR",
    "model": "VARCHAR",
    "response_id": "VARCHAR",
    "previous_response_id": "VARCHAR",
    "upstream_request_id": "VARCHAR",
    "service_tier_requested": "VARCHAR",
    "service_tier": "VARCHAR",
    "input_tokens": "BIGINT",
    "cached_tokens": "BIGINT",
    "cache_write_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "reasoning_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "web_search_calls": "BIGINT",
    "cache_status": "VARCHAR",
    "cache_missed_tokens": "BIGINT",
    "cost_usd": "DECIMAL(18,9)",
    "key_id": "VARCHAR",
    "key_hint": "VARCHAR",
    "key_name": "VARCHAR",
    "project": "VARCHAR",
    "user_id": "VARCHAR",
    "tags": "JSON",
    "ttfb_ms": "DOUBLE",
    "ttft_ms": "DOUBLE",
    "duration_ms": "DOUBLE",
    "upstream_processing_ms": "DOUBLE",
    "request_bytes": "BIGINT",
    "response_bytes": "BIGINT",
    "error_type": "VARCHAR",
    "error_code": "VARCHAR",
    "trace_id": "VARCHAR",
}
assert tuple(COLUMN_TYPES) == COLUMNS, "ledger columns must follow the record"


class Store(Protocol):
    """A place records are written to: DuckDB here, PostgreSQL for fleets."""

    def open(self) -> None: ...
    def write(self, records: list[Record]) -> None: ...
    def close(self) -> None: ...


# --- migrations ----------------------------------------------------------------
# An append-only list of small named steps, each applied once and recorded in
# `_meter_migrations`.  Never edit a step that has shipped; add a new one.


def _m001_requests(con: Any) -> None:
    # No PRIMARY KEY: an index on random UUIDs halves insert speed; ids stay
    # unique because each batch is inserted with an anti-join (see DuckDBStore).
    columns = ",\n  ".join(f"{name} {kind}" for name, kind in COLUMN_TYPES.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS requests (\n  {columns}\n)")


def _m002_usage_claims(con: Any) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS usage_claims (response_id VARCHAR PRIMARY KEY, request_id UUID, claimed_at TIMESTAMPTZ DEFAULT current_timestamp)")


MIGRATIONS: list[tuple[str, Callable[[Any], None]]] = [
    ("m001_requests", _m001_requests),
    ("m002_usage_claims", _m002_usage_claims),
]


def migrate_duckdb(con: Any) -> list[str]:
    """Apply the steps not yet recorded; returns their names."""
    con.execute("CREATE TABLE IF NOT EXISTS _meter_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ DEFAULT current_timestamp)")
    done = {row[0] for row in con.execute("SELECT name FROM _meter_migrations").fetchall()}
    applied = []
    for name, step in MIGRATIONS:
        if name in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            step(con)
            con.execute("INSERT INTO _meter_migrations (name) VALUES (?)", [name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(name)
    con.execute("CREATE OR REPLACE VIEW schema_version AS SELECT count(*) AS version, max(name) AS latest FROM _meter_migrations")
    return applied


# --- DuckDB --------------------------------------------------------------------


def _arrow_schema() -> Any:
    import pyarrow as pa

    arrow = {
        "UUID": pa.string(),
        "TIMESTAMPTZ": pa.float64(),
        "VARCHAR": pa.string(),
        "JSON": pa.string(),
        "INTEGER": pa.int32(),
        "BIGINT": pa.int64(),
        "BOOLEAN": pa.bool_(),
        "DOUBLE": pa.float64(),
        "DECIMAL(18,9)": pa.decimal128(18, 9),
    }
    return pa.schema([(name, arrow[kind]) for name, kind in COLUMN_TYPES.items()])


def records_to_arrow(records: Sequence[Record]) -> Any:
    """Columns, not rows: one Arrow array per column, built in C from Python lists."""
    import pyarrow as pa

    schema = _arrow_schema()
    arrays = [pa.array([getattr(r, name) for r in records], type=schema.field(name).type) for name in COLUMNS]
    return pa.Table.from_arrays(arrays, schema=schema)


def _select_from_batch() -> str:
    parts = []
    for name, kind in COLUMN_TYPES.items():
        if kind == "TIMESTAMPTZ":
            parts.append(f"to_timestamp({name})")
        elif kind in ("UUID", "JSON"):
            parts.append(f"{name}::{kind}")
        else:
            parts.append(name)
    return ", ".join(parts)


def needs_claim(record: Record) -> bool:
    """Only background responses can show the same usage on several rows (every poll
    after the end); a foreground response's usage is its creating request's alone."""
    return record.background and record.response_id is not None and record.has_usage


def claim_usage(records: Sequence[Record], already_claimed: set[str]) -> list[tuple[str, str]]:
    """Keep usage on the first row of each background response id; clear it on the rest.

    Returns the (response_id, request id) claims to store.  Pure, so both stores share it.
    """
    claims: list[tuple[str, str]] = []
    seen = already_claimed
    for record in records:
        rid = record.response_id
        if rid is None or not needs_claim(record):
            continue
        if rid in seen:
            record.clear_usage()
        else:
            seen.add(rid)
            claims.append((rid, record.id or ""))
    return claims


class DuckDBStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.con: Any = None
        # Idempotent by id without an index: a retried batch finds its rows among
        # those started no earlier than the batch's first record, which DuckDB's
        # zone maps on started_at narrow to the newest row groups.
        self._insert = (
            f"INSERT INTO requests SELECT {_select_from_batch()} FROM batch WHERE batch.id::UUID NOT IN "
            "(SELECT id FROM requests WHERE started_at >= (SELECT to_timestamp(min(started_at)) FROM batch))"
        )

    def open(self) -> None:
        import duckdb

        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One DuckDB worker thread: batches are small and frequent, and on a small
        # machine more threads only compete with the event loop for cores.
        self.con = duckdb.connect(self.path, config={"threads": 1})
        migrate_duckdb(self.con)

    def write(self, records: list[Record]) -> None:
        con = self.con
        candidates = sorted({r.response_id for r in records if needs_claim(r)})  # type: ignore[misc]
        con.execute("BEGIN TRANSACTION")
        try:
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
            batch = records_to_arrow(records)
            con.register("batch", batch)
            try:
                con.execute(self._insert)
            finally:
                con.unregister("batch")
            con.execute("COMMIT")
        except Exception:
            try:
                con.execute("ROLLBACK")
            except Exception:
                pass
            raise

    def cursor(self) -> Any:
        """A separate connection to the same database, for readers in other threads."""
        return self.con.cursor()

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None


# --- spool ---------------------------------------------------------------------


def record_to_json(record: Record) -> str:
    row = record.as_dict()
    if row["cost_usd"] is not None:
        row["cost_usd"] = str(row["cost_usd"])
    return json.dumps(row, separators=(",", ":"))


def record_from_json(text: str) -> Record:
    row = json.loads(text)
    if row.get("cost_usd") is not None:
        row["cost_usd"] = Decimal(row["cost_usd"])
    return Record(**{k: v for k, v in row.items() if k in COLUMN_TYPES})


class Spool:
    """Append-only overflow file for records the store could not take in time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: Sequence[Record]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(record_to_json(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Record]:
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(record_from_json(line))
                except (ValueError, TypeError):
                    log.error("skipping an unreadable spool line in %s", self.path)
        return records

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# --- the writer ----------------------------------------------------------------

_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def random_uuids(n: int) -> list[str]:
    """`n` random (version 4) UUIDs as strings, from one read of the OS's randomness.

    `str(uuid.uuid4())` per record made a system call and a UUID object each, and
    was the writer thread's largest cost (its GIL time is the event loop's loss).
    """
    digits = os.urandom(16 * n).hex()
    out = []
    for i in range(0, 32 * n, 32):
        h = digits[i : i + 32]
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return out



@dataclass
class LedgerStats:
    written: int = 0
    write_errors: int = 0
    spooled: int = 0
    healthy: bool = True
    last_error: str | None = None


class LedgerWriter:
    """Addon: batches records off the request path into a `Store`."""

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 0.5,
        batch_size: int = 5000,
        max_pending: int = 100_000,
        spool_path: Path | None = None,
        retry_max_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.spool = Spool(spool_path) if spool_path is not None else None
        self.retry_max_interval = retry_max_interval
        # Wake the writer at a full batch, or sooner when memory is bounded tighter,
        # so that an outage spills to the spool before the queue outgrows the bound.
        self._wake_at = min(batch_size, max_pending)
        self.stats = LedgerStats()
        self._queue: deque[Record] = deque()
        self._retry: list[Record] = []  # a failed batch, written before anything newer
        self._writing = 0  # size of the batch the thread is writing right now
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._opened = False

    # hooks --------------------------------------------------------------------

    def done(self, flow: object, record: Record) -> None:
        queue = self._queue
        queue.append(record)
        if len(queue) >= self._wake_at:
            self._wake.set()

    async def start(self) -> None:
        self.start_thread()

    async def stop(self) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # state for metrics and health ------------------------------------------

    @property
    def pending(self) -> int:
        """Records not yet in the store: queued, waiting for a retry, or being written."""
        return len(self._queue) + len(self._retry) + self._writing

    # thread ---------------------------------------------------------------------

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meter-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything (or spool what cannot be written) and close the store."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _open(self) -> bool:
        try:
            self.store.open()
        except Exception as exc:
            self._note_error(exc)
            return False
        self._opened = True
        if self.spool is not None:
            spooled = self.spool.read()
            if spooled:
                log.info("replaying %d spooled records from %s", len(spooled), self.spool.path)
                self._retry = spooled + self._retry
                self.spool.clear()
        return True

    def _note_error(self, exc: Exception) -> None:
        self.stats.write_errors += 1
        self.stats.healthy = False
        message = f"{type(exc).__name__}: {exc}"
        if message != self.stats.last_error:
            log.error("ledger write failed (%s); %d records waiting", message, self.pending)
        self.stats.last_error = message

    def _take_batch(self) -> list[Record]:
        if self._retry:
            batch, self._retry = self._retry[: self.batch_size], self._retry[self.batch_size :]
        else:
            queue = self._queue
            batch = [queue.popleft() for _ in range(min(len(queue), self.batch_size))]
        # Ids are minted here, off the event loop, before the first write attempt,
        # so a retried batch carries the same ids and stays idempotent.
        missing = [record for record in batch if record.id is None]
        for record, id_ in zip(missing, random_uuids(len(missing))):
            record.id = id_
        return batch

    def _flush_once(self, drain: bool = False) -> bool:
        """Write what was pending when called, and more only as whole batches (all of
        it when draining).  False when the store failed (records kept).

        Not "until the queue is empty": under steady traffic a few records arrive
        during every write, and chasing them turned one write per interval into
        back-to-back writes of a dozen records, each with a transaction's fixed cost,
        which kept a core busy in the ledger process at a thousand requests a second.
        """
        due = self.pending
        while (self._retry or self._queue) and (drain or due > 0 or len(self._queue) >= self.batch_size):
            batch = self._take_batch()
            due -= len(batch)
            self._writing = len(batch)
            try:
                self.store.write(batch)
            except Exception as exc:
                self._retry = batch + self._retry
                self._writing = 0
                self._note_error(exc)
                self._spill_overflow()
                self._reopen_later()
                return False
            self.stats.written += len(batch)
            self._writing = 0
            if not self.stats.healthy:
                log.info("ledger recovered; %d records waiting", self.pending)
            self.stats.healthy = True
            self.stats.last_error = None
        return True

    def _reopen_later(self) -> None:
        """After a failed write the connection may be unusable (DuckDB invalidates a
        database after an I/O error): close it, and open afresh on the next try."""
        try:
            self.store.close()
        except Exception:
            pass
        self._opened = False

    def _spill_overflow(self) -> None:
        """Bound memory while the store is down: the oldest records go to the spool."""
        excess = self.pending - self.max_pending
        if excess <= 0 or self.spool is None:
            return
        while self._queue and len(self._retry) < excess:
            self._retry.append(self._queue.popleft())
        spill, self._retry = self._retry[:excess], self._retry[excess:]
        try:
            self.spool.append(spill)
            self.stats.spooled += len(spill)
        except OSError as exc:
            log.error("could not spool %d records: %s", len(spill), exc)
            self._retry = spill + self._retry

    def _run(self) -> None:
        backoff = self.flush_interval
        while True:
            stopping = self._stopping
            if not self._opened and not self._open():
                ok = False
                self._spill_overflow()  # the store cannot even be opened: memory stays bounded
            else:
                ok = self._flush_once(drain=stopping)
            if stopping:
                if not ok and self.spool is not None and self.pending:
                    self._spill_all()
                break
            backoff = self.flush_interval if ok else min(self.retry_max_interval, max(backoff * 2, self.flush_interval))
            self._wake.wait(backoff)
            self._wake.clear()
        if self._opened:
            try:
                self.store.close()
            except Exception as exc:
                log.error("closing the ledger failed: %s", exc)

    def _spill_all(self) -> None:
        records = self._retry + list(self._queue)
        self._retry = []
        self._queue.clear()
        try:
            self.spool.append(records)  # type: ignore[union-attr]
            self.stats.spooled += len(records)
            log.warning("ledger unavailable at shutdown: %d records spooled to %s", len(records), self.spool.path)  # type: ignore[union-attr]
        except OSError as exc:
            log.error("could not spool %d records at shutdown: %s", len(records), exc)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything appended so far is written (tests, admin)."""
        deadline = time.monotonic() + timeout
        target = self.stats.written + self.pending
        self._wake.set()
        while time.monotonic() < deadline:
            if self.pending == 0 and self.stats.written >= target - self.stats.spooled:
                return True
            time.sleep(0.01)
            self._wake.set()
        return False
