"""The DuckDB ledger, run in a child process of its own: what `meter serve` writes through.

Measured under load, a DuckDB connection in the proxy's process cost ~300 us of
CPU per request although its inserts take ~30 us per record on their own: while
a statement runs, DuckDB's Python client keeps re-taking the GIL (to check for
signals, to prepare statements, to scan Arrow), and every hand-off interrupts
the event loop.  In a child process the same writes cost the proxy only the
pickling of each batch (a few us per record).

`ChildProcessStore` is a whole `Store`: each method sends a message over a
socket pair and waits for the child's answer; the child runs a `DuckDBStore`.
`iter_query` and `set_costs` go in chunks, one message each, so neither side
ever holds more than one batch.  The child ignores SIGINT/SIGTERM (its parent
drives shutdown) and exits when its parent's end of the socket closes, even
after a SIGKILL.

Every message carries a sequence number and its answer carries it back: after a
call gave up waiting (a slow query), its late answer is recognised and dropped,
so the next call never takes it for its own.  A failure comes back with its kind
(`refused`: these records; `outage`: the store; `unusable`: the ledger file
cannot be used at all), decided in the child where the exception's class is known.

The child runs as `python -m meter.ledger --fd N --ledger PATH --parent PID` (`__main__`),
started by the parent only.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from typing import Any

from ..record import COLUMNS, Record
from .alert_claims import AlertClaim
from .duckdb_store import CostUpdate, DuckDBStore
from .footprint import duckdb_library, page_out_code, yield_the_cpu
from .prune import Pruned
from .rows import EncodedBatch, decode_batch, decode_columns, encode_batch
from .sanitise import Cuts, columns_need_nothing, sanitise_counting
from .sql import SqlError, SqlResult, confine_duckdb, duckdb_sql
from .store import COST_CHUNK_ROWS, LedgerLost, LedgerNotOpen, LedgerUnavailable, LedgerUnusable, chunks, failure_kind

log = logging.getLogger("meter.ledger")

ANSWER_TIMEOUT = 120.0  # a write or query the child has not answered by then is given up
PRUNE_TIMEOUT = 3600.0  # one DELETE over a large ledger may take minutes

# DuckDB's settings in the ledger process (threads=1 comes with every `DuckDBStore`).
# memory_limit bounds DuckDB's buffer pool, which by default may take 80% of the
# machine's RAM and keeps every block it read cached up to that: without a bound the
# process grew with the ledger file and the reports run on it (175-218 MB under
# load).  The bound is what a checkpoint needs: it pins about one 256 KiB block per
# column being written plus its compressed copy, so a 44-column `requests` needed
# 23-27 MiB whatever the rows held (24 MiB failed with a FATAL error that leaves the
# database unusable, 28 MiB held through 1 KiB tags and ten 100-character columns).
# 768 KiB per column (33 MiB today) keeps ~20% over that and grows with migrations
# that add columns.  A larger query spills to the ledger's `.tmp` directory.
# checkpoint_threshold stays at DuckDB's 16 MB: a smaller one saved ~7 MB of
# uncheckpointed rows but checkpointed the partial row group more often (~10% of
# the ingest rate) and did not lower the peak, which is the checkpoint's own.
LEDGER_PROCESS_SETTINGS: dict[str, str | int | bool] = {"memory_limit": f"{len(COLUMNS) * 768}KiB"}

# The most records the writer sends in one batch (one message, one transaction), where
# other stores take the writer's 5,000.  The ledger process holds a batch whole while
# it writes it: its message, its values decoded in Python, then DuckDB's staging of it
# and the transaction's own copy, on top of the rows not yet checkpointed.  Measured
# with 120,000-150,000 records sent straight to a ledger process in full batches (with
# a copy of DuckDB's library of its own), its peak RSS was 110-112 MiB in batches of
# 5,000 and 104-105 MiB in batches of 3,000, for ~5% more CPU per record (a batch
# costs DuckDB ~6 ms besides its rows: statements, appender, commit); 2,500 saved no
# more memory than 3,000 and cost ~13%.
ROWS_PER_WRITE = 3000


class LedgerChildError(LedgerUnavailable):
    """The child reported a failure, or could not be reached.  `kind` is what the
    child made of it (see `failure_kind`)."""

    def __init__(self, message: str, kind: str = "unknown") -> None:
        super().__init__(message)
        self.kind = kind


class LedgerChildLost(LedgerChildError, LedgerLost):
    """The child is gone or stopped answering: a fresh one must be started."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "outage")


class ChildProcessStore:
    dialect = "duckdb"
    sanitises = True  # in the ledger process, off the proxy's GIL
    encode = staticmethod(encode_batch)  # what `write` sends; the writer may do it beforehand
    rows_per_write = ROWS_PER_WRITE  # the writer's batches, at most
    cost_chunk_rows = COST_CHUNK_ROWS  # changes `set_costs` holds at a time

    def __init__(self, path: str, open_timeout: float = 60.0) -> None:
        self.path = path
        self.open_timeout = open_timeout
        self.con: Connection | None = None  # None when closed
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request/answer exchange at a time
        self._seq = itertools.count(1)

    def open(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                # --parent: who started it, so that a process that finds it holding the
                # ledger can tell a live meter's from one whose meter was killed
                # (`duckdb_store.orphaned_ledger_process`).
                [sys.executable, "-m", "meter.ledger", "--fd", str(child.fileno()), "--ledger", self.path, "--parent", str(os.getpid())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.con = Connection(parent.detach())
        try:
            self._call(("open",), timeout=self.open_timeout)
        except LedgerChildLost:
            status = self._discard()
            if status is None:
                raise  # it did not answer in time, and was stopped: an outage
            # It ended before it could answer (it cannot even import meter, say): this
            # ledger can never be written, which fails start-up; after start, an outage.
            raise LedgerUnusable(f"ledger {self.path}: the ledger process ended before it opened the file ({_how_it_ended(status)}; its error, if any, is above)") from None
        except LedgerChildError as exc:
            self._discard()
            if exc.kind == "unusable":
                raise LedgerUnusable(str(exc)) from None
            raise
        except Exception:
            self._discard()
            raise

    def _call(self, message: tuple[Any, ...], timeout: float = ANSWER_TIMEOUT) -> Any:
        con = self.con
        if con is None:
            raise LedgerNotOpen(f"the ledger {self.path} is not open")
        with self._lock:
            seq = next(self._seq)
            deadline = time.monotonic() + timeout
            try:
                con.send((seq, *message))
                while True:
                    if not con.poll(max(0.0, deadline - time.monotonic())):
                        raise LedgerChildLost(f"the ledger process did not answer within {timeout:.0f}s")
                    answer = con.recv()
                    if answer[0] == seq:
                        break
                    # The late answer of a call that gave up waiting: not ours.
            except (EOFError, OSError) as exc:
                raise LedgerChildLost(f"the ledger process is gone ({type(exc).__name__})") from None
        _, status, payload, *kind = answer
        if status != "ok":
            raise LedgerChildError(payload, kind[0] if kind else "unknown")
        return payload

    def write(self, records: Sequence[Record]) -> Cuts | None:
        """Sanitised and written in the ledger process (`sanitises`): the proxy's
        writer thread only encodes the batch (`rows.encode_batch`)."""
        chunks = records.chunks if isinstance(records, EncodedBatch) else None
        try:
            cuts: Cuts = self._call(("write", chunks if chunks is not None else encode_batch(records)))
        except LedgerChildLost as exc:
            status = self._discard()  # a fresh child is started at the writer's next open()
            if status is None:
                raise
            raise LedgerChildLost(f"{exc}: {_how_it_ended(status)}") from None
        return cuts

    def probe(self) -> None:
        """An empty batch through the child's whole write path (see `LedgerWriter`)."""
        self.write([])

    def query(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        names, rows = self._call(("query", sql, list(params)))
        return names, rows

    def iter_query(self, sql: str, params: Sequence[Any] = (), *, batch_rows: int = 50_000) -> Iterator[list[tuple[Any, ...]]]:
        cursor = self._call(("iter", sql, list(params), batch_rows))
        finished = False
        try:
            while batch := self._call(("next", cursor)):
                yield batch
            finished = True  # the child dropped the cursor with its last (empty) batch
        finally:
            if not finished:
                self._quietly(("drop", cursor))

    def sql(self, sql: str, limit: int, timeout: float) -> SqlResult:
        """A user's read-only SELECT (`meter sql`), on the child's confined database."""
        try:
            result: SqlResult = self._call(("sql", sql, limit, timeout), timeout=timeout + ANSWER_TIMEOUT)
        except LedgerChildError as exc:
            if exc.kind == "refused" and str(exc).startswith("SqlError: "):
                raise SqlError(str(exc).removeprefix("SqlError: ")) from None
            raise
        return result

    def set_costs(self, changes: Iterable[tuple[str, Decimal | None]]) -> int:
        update = self._call(("costs",))
        try:
            for chunk in chunks(changes, self.cost_chunk_rows):
                self._call(("costs_add", update, chunk))
        except BaseException:
            self._quietly(("costs_abort", update))
            raise
        return int(self._call(("costs_commit", update)))

    def prune(self, before: datetime) -> Pruned:
        pruned: Pruned = self._call(("prune", before), timeout=PRUNE_TIMEOUT)
        return pruned

    def claim_alert(self, alert: AlertClaim, owner: str, lease_until: datetime) -> bool:
        return bool(self._call(("claim_alert", alert, owner, lease_until)))

    def update_alert(self, alert: AlertClaim, owner: str, lease_until: datetime | None, sent: bool) -> bool:
        return bool(self._call(("update_alert", alert, owner, lease_until, sent)))

    def take_alerts(self, owner: str, now: datetime, lease_until: datetime) -> list[AlertClaim]:
        return list(self._call(("take_alerts", owner, now, lease_until)))

    def _quietly(self, message: tuple[Any, ...]) -> None:
        """Release what a call left in the child; a lost child has released it already."""
        try:
            self._call(message)
        except LedgerUnavailable as exc:
            log.debug("ledger process: %s failed: %s", message[0], exc)

    def close(self) -> None:
        if self.con is not None:
            try:
                self._call(("close",), timeout=60)
            except LedgerChildError as exc:
                log.error("closing the ledger process: %s", exc)
        self._discard(wait=True)

    def _discard(self, wait: bool = False) -> int | None:
        """Let the child go; its exit status (None: there was none, or it did not end
        once its socket closed and was killed here)."""
        if self.con is not None:
            self.con.close()
            self.con = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            return proc.wait(30 if wait else 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None


def _how_it_ended(status: int) -> str:
    """A child's exit status in words.  A SIGKILL leaves no traceback in the log: it is
    what the kernel's OOM killer sends, so it is named."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"it was killed by {name}" + (", as the kernel's OOM killer does" if name == "SIGKILL" else "")
    return f"it exited with status {status}"


class _PagedOutStore(DuckDBStore):
    """The ledger process's store: the DuckDB code that connecting ran (`footprint`) is
    handed back before the migrations run, not only once the ledger is open.  Both
    run much code the other does not, and with all of it resident at once the open
    was the process's peak while the load stayed light: 75 MiB, 63 MiB so (a page-out
    after importing DuckDB too saved nothing more)."""

    def _connect(self) -> Any:
        con = super()._connect()
        page_out_code(duckdb_library())
        return con


class _Child:
    """The child's side: a `DuckDBStore` and the cursors and cost updates in progress,
    each known by the sequence number of the message that began it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.store: DuckDBStore | None = None
        self.cursors: dict[int, Generator[list[tuple[Any, ...]], None, None]] = {}
        self.updates: dict[int, CostUpdate] = {}

    def answer(self, seq: int, op: str, args: list[Any]) -> Any:
        if op == "open":
            self.store = _PagedOutStore(self.path, LEDGER_PROCESS_SETTINGS)
            self.store.open()
            # After the migrations: from here on no statement reaches past the ledger
            # (`meter sql` runs here; the writes need nothing it shuts off).
            confine_duckdb(self.store.con)
            page_out_code(duckdb_library())  # what opening ran is not needed again
            return None
        store = self.store
        assert store is not None, "the parent opens first"
        if op == "write":
            chunks = args.pop()
            columns = decode_columns(chunks)
            if columns_need_nothing(columns) and not any(columns["background"]):
                # The usual batch: nothing to sanitise, count or claim (a claim is only
                # ever a background response's), so no record is made per row.  Only
                # `write_columns` holds the batch then: it lets go of it before the commit.
                del chunks
                values = [columns[name] for name in COLUMNS]
                del columns
                store.write_columns(values)
                return {}, {}
            records = decode_batch(chunks)
            cuts = sanitise_counting(records)
            store.write(records)
            return cuts  # only once written: a failed write is retried and counted then
        elif op == "query":
            return store.query(args[0], args[1])
        elif op == "sql":
            return duckdb_sql(store.con, args[0], args[1], args[2])
        elif op == "iter":
            self.cursors[seq] = store.iter_query(args[0], args[1], batch_rows=args[2])
            return seq
        elif op == "next":
            cursor = self.cursors[args[0]]
            try:
                batch = next(cursor, [])
            except BaseException:
                del self.cursors[args[0]]
                raise
            if not batch:
                del self.cursors[args[0]]
            return batch
        elif op == "drop":
            if args[0] in self.cursors:
                self.cursors.pop(args[0]).close()
        elif op == "costs":
            self.updates[seq] = store.begin_costs()
            return seq
        elif op == "costs_add":
            self.updates[args[0]].add(args[1])
        elif op == "costs_commit":
            return self.updates.pop(args[0]).commit()
        elif op == "costs_abort":
            update = self.updates.pop(args[0], None)
            if update is not None:
                update.abort()
        elif op == "prune":
            return store.prune(*args)
        elif op == "claim_alert":
            return store.claim_alert(*args)
        elif op == "update_alert":
            return store.update_alert(*args)
        elif op == "take_alerts":
            return store.take_alerts(*args)
        return None

    def close(self) -> None:
        for cursor in self.cursors.values():
            cursor.close()
        for update in self.updates.values():
            update.abort()
        self.cursors.clear()
        self.updates.clear()
        if self.store is not None:
            self.store.close()
            self.store = None


def _invalidates(exc: Exception) -> bool:
    """DuckDB's FATAL errors (a checkpoint that could not finish) leave the database
    refusing every later statement: only a fresh open of the file recovers it."""
    return any(cls.__name__ == "FatalException" for cls in type(exc).__mro__)


def _serve(con: Connection, path: str) -> None:
    child = _Child(path)
    try:
        while True:
            try:
                message = con.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            seq, op, *args = message
            del message  # a batch's chunks: let go of as soon as read (`_Child.answer`)
            if op == "close":
                child.close()
                con.send((seq, "ok", None))
                break
            try:
                con.send((seq, "ok", child.answer(seq, op, args)))
            except LedgerUnusable as exc:
                con.send((seq, "error", str(exc), "unusable"))
                break
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which keeps the records and retries
                con.send((seq, "error", f"{type(exc).__name__}: {exc}", failure_kind(exc)))
                if op == "open" or _invalidates(exc):
                    break  # the parent starts a fresh process, which replays the WAL
    finally:
        child.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="meter's DuckDB ledger process (started by meter serve)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--parent", type=int, help="the meter serve that started it (read by other processes, see ChildProcessStore.open)")
    args = parser.parse_args()
    # Its few warnings (`DuckDBStore.open` waiting for a killed meter's ledger process)
    # share the parent's stderr: in the parent's format (`cli._setup_logging`).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The parent decides when to stop; a Ctrl-C to the process group must not
    # kill the ledger before the parent has flushed into it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield_the_cpu()
    # Files DuckDB creates (the ledger, its WAL) hold user ids, metadata and key
    # names: readable and writable by their owner only.
    os.umask(0o077)
    os.set_inheritable(args.fd, False)
    con = Connection(args.fd)
    try:
        _serve(con, args.ledger)
    finally:
        con.close()

