"""The ledger's two files of records beside the store: the spool and the rejected file.

The spool holds records the store could not take in time (an outage, a slow
store, a shutdown while it was down); the writer replays it into the store at
its next open.  The rejected file holds records the store refused for their
values, each with the store's reason, for a person to look at: meter never
retries them.  Both are JSON lines, created readable and writable by their
owner only (they hold user ids, metadata and key names), and each append is
synced to disk before the records count as kept.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from ..record import COLUMNS, Record
from .schema import mint_ids
from .store import LedgerUnusable

log = logging.getLogger("meter.ledger")


def check_directory(path: str | Path, what: str) -> None:
    """A file meter will create must have its directory already: a typo must not make a tree."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise LedgerUnusable(f"{what} {path}: directory {parent} does not exist")


# Text encoded and written at a time by `append_synced`: a spill is half of
# --ledger-max-pending records, a shutdown's everything waiting, and their lines as
# one text (and its bytes) would hold two more copies of them, when the ledger is
# down and memory is at its bound already.
APPEND_CHUNK_CHARS = 1 << 20


def append_synced(path: Path, lines: Iterable[str]) -> None:
    """Append `lines` to `path` (created owner-only), a slice at a time, and sync them
    to disk; or nothing.

    A disk that fills part-way through takes some of the lines and refuses the rest:
    the caller keeps every record of a failed append, so the part that fit is cut off
    again, or it would be replayed a second time, its torn last line read as an
    unreadable one."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            for text in _slices(lines):
                view = memoryview(text.encode("utf-8"))
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):  # the append's own error is the one to raise
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _slices(lines: Iterable[str]) -> Iterator[str]:
    """The lines joined into texts of about `APPEND_CHUNK_CHARS` (one line may be longer)."""
    held: list[str] = []
    length = 0
    for line in lines:
        held.append(line)
        length += len(line)
        if length >= APPEND_CHUNK_CHARS:
            yield "".join(held)
            held, length = [], 0
    if held:
        yield "".join(held)


def record_to_json(record: Record) -> str:
    row = record.as_dict()
    if row["cost_usd"] is not None:
        row["cost_usd"] = str(row["cost_usd"])
    if record.session_of is not None:
        row["session_of"] = record.session_of  # a chain still to settle from the ledger when replayed
    if record.attribution_of is not None:
        row["attribution_of"] = record.attribution_of  # so is a background response's creator
    return json.dumps(row, separators=(",", ":"))


_COLUMN_SET = frozenset((*COLUMNS, "session_of", "attribution_of"))


def record_from_json(text: str) -> Record:
    row = json.loads(text)
    if row.get("cost_usd") is not None:
        row["cost_usd"] = Decimal(row["cost_usd"])
    return Record(**{k: v for k, v in row.items() if k in _COLUMN_SET})


class Spool:
    """Append-only overflow file for records the store could not take in time.

    The writer takes it back a portion at a time (`take`), so a spool far larger than
    `--ledger-max-pending` (a long outage) is replayed within that bound, and the file
    stays until what was taken from it is written (`forget_taken`): a crash meanwhile
    leaves it to be replayed again, which writes each record once (its id, minted
    before it was spooled, travels with it).  Each line is read on its own, so a bad
    byte costs at most its own line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # the writer and the spiller both append
        self._taken_to = 0  # bytes of the file taken back so far
        # Lines in the file not taken back yet, a previous run's included: records not in
        # the ledger, which a report must say it leaves out (SPEC §2b).
        self.untaken = self._lines_from(0)

    def append(self, records: Sequence[Record]) -> None:
        """Append `records`, each with an id of its own (minted here where it has none),
        so that a spool replayed twice (a crash mid-replay) writes each once."""
        mint_ids(records)
        lines: Iterable[str] = (record_to_json(record) + "\n" for record in records)
        with self._lock:
            if not self._ends_a_line():
                lines = itertools.chain(["\n"], lines)  # a line torn by a crash stays alone: it must not take the next one with it
            append_synced(self.path, lines)
            self.untaken += len(records)

    def _ends_a_line(self) -> bool:
        """Whether the file is absent, empty, or ends with a line end."""
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) == 0:
                    return True
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"\n"
        except FileNotFoundError:
            return True

    def read(self) -> list[Record]:
        """Every record in the file (what a person or a test reads; the writer takes)."""
        return self._read_from(0, None)[0]

    def _lines_from(self, offset: int) -> int:
        """Lines holding something from byte `offset` on: a count, reading a block at a time."""
        count = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                for raw in f:
                    count += bool(raw.strip())
        except FileNotFoundError:
            return 0
        return count

    def take(self, n: int) -> list[Record]:
        """Up to n records after those taken before; the file keeps them until `forget_taken`."""
        with self._lock:
            if self._size() < self._taken_to:  # a new file since (removed and spooled to again)
                self._taken_to = 0
                self.untaken = self._lines_from(0)
            records, self._taken_to, lines = self._read_from(self._taken_to, n)
            self.untaken = max(0, self.untaken - lines)
        return records

    def waiting(self) -> bool:
        """Whether the file holds records not taken yet."""
        return self._size() > self._taken_to

    def forget_taken(self) -> None:
        """What was taken is written: once that is the whole file, remove it."""
        with self._lock:
            if self._taken_to and self._size() <= self._taken_to:
                self.clear()
                self._taken_to = 0

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def _read_from(self, offset: int, n: int | None) -> tuple[list[Record], int, int]:
        """Up to n records (all with None) from byte `offset`, the offset after them, and
        the lines read (an unreadable one is skipped, and counted)."""
        records: list[Record] = []
        lines = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                for raw in f:
                    offset += len(raw)
                    line = raw.strip()
                    if not line:
                        continue
                    lines += 1
                    try:
                        # A byte that is not UTF-8 inside a value keeps its record, as U+FFFD.
                        records.append(record_from_json(line.decode("utf-8", "replace")))
                    except Exception:  # noqa: BLE001 - any line that is no record (a bad cost, a JSON array...) is skipped, never the replay
                        log.error("skipping an unreadable spool line in %s", self.path)
                    if n is not None and len(records) >= n:
                        break
        except FileNotFoundError:
            return [], 0, 0
        return records, offset, lines

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.untaken = 0


class RejectedFile:
    """Records a store refused, one JSON line each with the store's reason: kept for a
    person to look at (and replay by hand), never retried by meter."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, rejected: Sequence[tuple[Record, str]]) -> int:
        """Append each (record, reason), with one fsync for them all; the number
        written.  A record whose values cannot be written as JSON (only a bug can make
        one) is skipped and logged, and the rest still go."""
        now = datetime.now(UTC).isoformat()
        lines = []
        for record, reason in rejected:
            try:
                lines.append(json.dumps({"rejected_at": now, "reason": reason, "record": json.loads(record_to_json(record))}) + "\n")
            except Exception as exc:  # noqa: BLE001 - one unwritable record must not cost the others their line
                log.error("could not write the rejected record %s to %s: %s: %s", record.id, self.path, type(exc).__name__, exc)
        if lines:
            append_synced(self.path, lines)
        return len(lines)


def rejected_path_for(store: object, spool_path: Path | None) -> Path | None:
    """`<ledger>.rejected.jsonl` beside a ledger file; else `<spool>.rejected.jsonl`."""
    path = getattr(store, "path", None)
    if isinstance(path, str) and path != ":memory:":
        return Path(path + ".rejected.jsonl")
    if spool_path is not None:
        return Path(str(spool_path) + ".rejected.jsonl")
    return None
