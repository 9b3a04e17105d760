"""The embedded DuckDB ledger, run in a child process of its own.

Measured under load, a DuckDB connection in the proxy's process cost ~300 us of
CPU per request although its inserts take ~30 us per record on their own: while
a statement runs, DuckDB's Python client keeps re-taking the GIL (to check for
signals, to prepare statements, to scan Arrow), and every hand-off interrupts
the event loop.  In a child process the same writes cost the proxy only the
pickling of each batch (a few us per record).

`ChildProcessStore` is a `Store` for the ledger writer's thread: `write` sends
a batch over a socket pair and waits for the child's answer; `cursor` gives
readers (the report API, tests) a DB-API-like cursor whose queries run in the
child.  The child ignores SIGINT/SIGTERM (its parent drives shutdown) and exits
when its parent's end of the socket closes, even after a SIGKILL.

Every message carries a sequence number and its answer carries it back: after a
call gave up waiting (a slow query), its late answer is recognised and dropped,
so the next call never takes it for its own.  A failure comes back with its kind
(`refused`: these records; `outage`: the store; `unusable`: the ledger file
cannot be used at all), decided in the child where the exception's class is known.
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
from multiprocessing.connection import Connection
from typing import Any

from .record import Record, record_row

log = logging.getLogger("meter.ledger")

ANSWER_TIMEOUT = 120.0  # a write or query the child has not answered by then is given up


class LedgerChildError(Exception):
    """The child reported a failure, or could not be reached.  `kind` is what the
    child made of it (see `meter.ledger.failure_kind`)."""

    kind = "unknown"

    def __init__(self, message: str, kind: str = "unknown") -> None:
        super().__init__(message)
        self.kind = kind


class LedgerChildLost(LedgerChildError):
    """The child is gone or stopped answering: a fresh one must be started."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "outage")


class RemoteResult:
    def __init__(self, names: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.description = [(name,) for name in names]
        self._rows = rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None


class RemoteCursor:
    """What readers need of a DuckDB cursor, with the query run in the child."""

    def __init__(self, store: ChildProcessStore) -> None:
        self._store = store

    def execute(self, sql: str, params: Any = None) -> RemoteResult:
        names, rows = self._store.query(sql, list(params or []))
        return RemoteResult(names, rows)

    def close(self) -> None:
        pass


class ChildProcessStore:
    def __init__(self, path: str, open_timeout: float = 60.0) -> None:
        self.path = path
        self.open_timeout = open_timeout
        self.con: Connection | None = None  # named like DuckDBStore's: None when closed
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request/answer exchange at a time
        self._seq = itertools.count(1)

    def open(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "meter.ledger_child", "--fd", str(child.fileno()), "--ledger", self.path],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.con = Connection(parent.detach())
        try:
            self._call(("open",), timeout=self.open_timeout)
        except LedgerChildError as exc:
            self._discard()
            if exc.kind == "unusable":
                from .ledger import LedgerUnusable

                raise LedgerUnusable(str(exc)) from None
            raise
        except Exception:
            self._discard()
            raise

    def _call(self, message: tuple[Any, ...], timeout: float = ANSWER_TIMEOUT) -> Any:
        con = self.con
        if con is None:
            raise LedgerChildError("the ledger is not open")
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

    def write(self, records: list[Record]) -> None:
        try:
            self._call(("write", [record_row(r) for r in records]))
        except LedgerChildLost:
            self._discard()  # a fresh child is started at the writer's next open()
            raise

    def probe(self) -> None:
        """An empty batch through the child's whole write path (see `LedgerWriter`)."""
        try:
            self._call(("write", []))
        except LedgerChildLost:
            self._discard()
            raise

    def query(self, sql: str, params: list[Any], timeout: float = ANSWER_TIMEOUT) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self._call(("query", sql, params), timeout=timeout)

    def cursor(self) -> RemoteCursor:
        if self.con is None:
            raise LedgerChildError("the ledger is not open")
        return RemoteCursor(self)

    def close(self) -> None:
        if self.con is not None:
            try:
                self._call(("close",), timeout=60)
            except LedgerChildError as exc:
                log.error("closing the ledger process: %s", exc)
        self._discard(wait=True)

    def _discard(self, wait: bool = False) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(30 if wait else 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(con: Connection, path: str) -> None:
    from .ledger import DuckDBStore, LedgerUnusable, failure_kind

    store: DuckDBStore | None = None
    while True:
        try:
            message = con.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        seq, op = message[0], message[1]
        try:
            if op == "open":
                store = DuckDBStore(path)
                store.open()
                con.send((seq, "ok", None))
            elif op == "write":
                assert store is not None
                store.write([Record(*row) for row in message[2]])
                con.send((seq, "ok", None))
            elif op == "query":
                assert store is not None
                cur = store.cursor()
                try:
                    res = cur.execute(message[2], message[3])
                    names = [d[0] for d in res.description] if res.description else []
                    con.send((seq, "ok", (names, res.fetchall())))
                finally:
                    cur.close()
            elif op == "close":
                if store is not None:
                    store.close()
                    store = None
                con.send((seq, "ok", None))
                break
        except LedgerUnusable as exc:
            con.send((seq, "error", str(exc), "unusable"))
            break
        except Exception as exc:  # reported to the parent, which keeps the records and retries
            con.send((seq, "error", f"{type(exc).__name__}: {exc}", failure_kind(exc)))
            if op == "open":
                break
    if store is not None:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="meter's DuckDB ledger process (started by meter serve)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--ledger", required=True)
    args = parser.parse_args()
    # The parent decides when to stop; a Ctrl-C to the process group must not
    # kill the ledger before the parent has flushed into it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Batch writes can wait; requests cannot: on a busy machine the proxy gets the CPU first.
    try:
        os.nice(10)
    except OSError:
        pass
    # Files DuckDB creates (the ledger, its WAL) hold user ids, metadata and key
    # names: readable and writable by their owner only.
    os.umask(0o077)
    os.set_inheritable(args.fd, False)
    con = Connection(args.fd)
    try:
        _serve(con, args.ledger)
    finally:
        con.close()


if __name__ == "__main__":
    main()
