"""The ledger sink: records leave the request path and land in a `Store`.

`LedgerWriter` is an addon.  Its `done` hook only appends the record to a deque;
a writer thread wakes every `flush_interval` (or when a batch is full) and
writes the batch in one call, so the event loop never waits on the database.
If the store fails, records wait in memory up to `max_pending`; past that they
go to a spool file (JSON lines) that is replayed into the store at the next
start.  A spill thread keeps that bound while the writer waits on a slow store.

Hostile input (SPEC §2b): every batch passes `sanitise` before it is stored, the
one step every store shares: in the writer's thread, or, for a store that
`sanitises` (the DuckDB ledger process), in that store's own process, which
answers what it cut.  A batch the store
still refuses is split until the refused records are isolated; those go, with
the store's reason, to the rejected file (`<ledger>.rejected.jsonl`, or
`<spool>.rejected.jsonl` when the ledger is not a file) and the rest is
written; so does a record meter's own writing fails on (a bug), which would
otherwise fail its batch on every retry.  An outage (the store cannot be reached or written at all) is not a
refusal: records wait, then spool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attribution import DROPPED_TAG, links_asked, links_query, resolve_links
from ..record import Record
from .preparing import BatchPreparer, pop_up_to
from .rows import EncodedBatch
from .sanitise import Cuts, add_cuts, clean_text, new_overflows, new_truncated, sanitise_batch
from .schema import mint_ids
from .spool import RejectedFile, Spool, check_directory, rejected_path_for
from .store import LedgerLost, LedgerRefused, LedgerUnusable, Store, failure_kind

log = logging.getLogger("meter.ledger")

@dataclass
class LedgerStats:
    written: int = 0
    write_errors: int = 0
    spooled: int = 0
    healthy: bool = True
    last_error: str | None = None
    rejected: int = 0  # records a store refused, set aside in the rejected file
    dropped: int = 0  # records lost while neither the store nor the spool took them (`HARD_BOUND`)
    # Per bounded text field, values cut to their bound; per endpoint, records with a
    # number the ledger's types cannot hold (stored NULL).  Every key is there from the
    # start, so a reader on another thread can iterate while the writer counts.
    truncated: dict[str, int] = field(default_factory=new_truncated)
    overflows: dict[str, int] = field(default_factory=new_overflows)


# While neither the store nor the spool takes records (their disk full: the spool sits
# beside the ledger by default), records wait in memory up to this many times
# `max_pending`; past that the oldest are dropped, counted and logged.  Unbounded, the
# queue grew until the kernel's OOM killer ended meter, every record in memory with it.
HARD_BOUND = 2
_DROP_LOG_EVERY = 10.0  # seconds between two ERROR lines about dropped records (each drop is counted)


class MeterCouldNotPrepare(LedgerRefused):
    """meter's own work on records before the store (ids, sanitising, sessions) raised
    on their values: a bug in meter, handled as a refusal of those records (the store
    is not at fault), its cause the original error."""


def _reason(exc: Exception) -> str:
    """A rejected record's reason, as its line in the rejected file says it."""
    if isinstance(exc, MeterCouldNotPrepare):
        return f"meter could not prepare the record (a bug in meter): {exc}"
    return f"{type(exc).__name__}: {exc}"


def _pop_all(queue: deque[Record]) -> list[Record]:
    """Every record off the queue, one at a time: copied then cleared, a record `done`
    appended in between would be lost."""
    records: list[Record] = []
    try:
        while True:
            records.append(queue.popleft())
    except IndexError:
        return records


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
        self._store_sanitises = bool(getattr(store, "sanitises", False))  # see `Store`
        self.flush_interval = flush_interval
        # A store may take smaller batches (`ChildProcessStore.rows_per_write`: the
        # ledger process holds a batch in Python and in DuckDB while it writes it).
        self.batch_size = min(batch_size, getattr(store, "rows_per_write", batch_size))
        self.max_pending = max_pending
        self.spool = Spool(spool_path) if spool_path is not None else None
        rejected = rejected_path_for(store, spool_path)
        self.rejected = RejectedFile(rejected) if rejected is not None else None
        self.retry_max_interval = retry_max_interval
        # A batch never holds more than the bound: one that a slow store holds (a locked
        # table) is out of the spill thread's reach for as long as the store holds it,
        # and a writer that wakes late finds the queue, or a replayed spool, past the
        # bound.  The writer wakes at a full batch, so that an outage spills to the
        # spool before the queue outgrows the bound.
        self._batch_at_most = min(self.batch_size, max_pending)
        # Queue length past which the spill thread runs: `max_pending` less what the
        # writer holds (the batch in flight, a retry), kept current by the writer.
        self._spill_at = max_pending
        self.stats = LedgerStats()
        self._queue: deque[Record] = deque()
        self._retry: list[Record] = []  # a failed batch, written before anything newer
        self._writing = 0  # size of the batch the thread is writing right now
        # The batch itself, from the moment its records leave `_queue` or `_retry` until
        # its write has ended: what `close` spools if the store outlasts its wait.
        self._in_flight: list[Record] = []
        self._spilling = 0  # records on their way to the spool
        self._replaying = 0  # records on their way back from it (`_replay_spool`)
        self._wake = threading.Event()
        self._spill = threading.Event()  # set by `done` when the queue passes max_pending
        self._spill_lock = threading.Lock()  # one spiller at a time: the writer or the spill thread
        # A spool that failed (its disk full too, as it is beside the ledger by default)
        # is not tried again before `_spool_retry_at`, with a backoff like the store's:
        # every request past the bound would wake the spill thread to encode thousands
        # of records for a write that fails, under the proxy's GIL, and log it each time.
        self._spool_failing = False
        self._spool_backoff = 0.0
        self._spool_retry_at = 0.0
        self._dropped_logged_at = -_DROP_LOG_EVERY
        self._dropped_unlogged = 0
        self._closing = threading.Event()  # set by `close`: ends a spill thread's wait
        # Held while the writer's thread moves records between `_queue`, `_retry` and
        # `_in_flight`, and by `close` (with `_spill_lock`) when it gives up on the thread:
        # every record is then in one of them (or in the spool), never only in the hands
        # of a thread about to be left behind.  Only for moves in memory, never over I/O.
        self._hand_lock = threading.Lock()
        self._abandoned = False  # close gave up on the thread and spooled what it held
        self._store_lost = False  # the last failure lost the store's process or connection (`LedgerLost`)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._spill_thread: threading.Thread | None = None
        self._opened = False
        self._preparer: BatchPreparer | None = None  # set when serving: see `start`
        self._replayed_at_open = False  # the spool is read back at the first open, not at every reopen

    # hooks --------------------------------------------------------------------

    def done(self, flow: object, record: Record) -> None:
        queue = self._queue
        queue.append(record)
        n = len(queue)
        # Each event is set once, not again while it is: a queue that stays long (the
        # ledger behind) would otherwise cost every request a lock and a notify.
        if n >= self._batch_at_most and not self._wake.is_set():
            self._wake.set()
        if n > self._spill_at and not self._spill.is_set():
            self._spill.set()  # the store is slow or down: the spill thread bounds memory

    async def start(self) -> None:
        """Open the store before serving, so that a ledger that cannot be used at all
        fails start-up (`LedgerUnusable`); any other failure is an outage the thread
        rides out (a PostgreSQL server not up yet), as after start."""
        import asyncio

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.first_open)
        # A store that sanitises its own batches may have them encoded on the loop, where
        # nothing changes a record between encoding and writing.
        self._preparer = BatchPreparer(loop, self._queue, getattr(self.store, "encode", None) if self._store_sanitises else None)
        self.start_thread()

    async def stop(self) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # state for metrics and health ------------------------------------------

    @property
    def pending(self) -> int:
        """Records not yet in the store: queued, waiting for a retry, being written or
        being spooled.  Never less than the truth (each count is raised before records
        leave the queue), so 0 means every record handed over has settled."""
        # `_replaying` before `_retry`: records the spool hands back are in one of the
        # two at every moment, and read in this order never in neither (`_replay_spool`).
        return self._replaying + len(self._queue) + len(self._retry) + self._writing + self._spilling

    @property
    def spooled(self) -> int:
        """Records in the spool not taken back yet (an outage's, or a previous run's)."""
        return self.spool.untaken if self.spool is not None else 0

    @property
    def unwritten(self) -> int:
        """Records not in the ledger, which a report leaves out: `pending` and `spooled`.

        Read from the event loop while the writer's threads move records both ways
        between the two, each counted in its new place before it leaves the old
        (`_spilling`, `_replaying`): `pending` is read before and after `spooled`, so
        a record moving either way is in one of the reads whatever the interleaving.
        An upper bound for a moment, never less than the truth."""
        before = self.pending
        spooled = self.spooled
        return spooled + max(before, self.pending)

    # thread ---------------------------------------------------------------------

    def first_open(self) -> None:
        """Open the store now; raise `LedgerUnusable` if it never can be."""
        if getattr(self.store, "dialect", None) == "duckdb" and self.store.path != ":memory:":  # type: ignore[attr-defined]
            # The ledger's directory first: the spool's and the rejected file's are beside
            # it by default, and a missing one is the ledger's setting to name, not theirs.
            check_directory(self.store.path, "ledger")  # type: ignore[attr-defined]
        if self.spool is not None:
            check_directory(self.spool.path, "spool")
        if self.rejected is not None:
            check_directory(self.rejected.path, "rejected file")
        self._open(raise_unusable=True)

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meter-ledger", daemon=True)
        self._thread.start()

    def _start_spiller(self) -> None:
        """After the first open, which replays the spool: records spilled before it
        would come straight back."""
        if self.spool is not None and self._spill_thread is None and not self._stopping:
            self._spill_thread = threading.Thread(target=self._run_spiller, name="meter-ledger-spill", daemon=True)
            self._spill_thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything (or spool what cannot be written) and close the store.

        The writer's thread gets `timeout` seconds.  A store that has not answered by
        then (a hung ledger process waits up to `child_store.ANSWER_TIMEOUT`) is left
        to it, and every record not known to be written goes to the spool: the queue,
        the retry list and the batch the store holds.  If that write commits after all,
        the replay writes its records once (both stores keep a row once by its id)."""
        self._stopping = True
        self._closing.set()
        self._wake.set()
        self._spill.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            self._thread = None
        if self._spill_thread is not None:
            self._spill_thread.join(timeout)
            self._spill_thread = None
        if thread is not None and thread.is_alive():
            self._abandon(timeout)

    def _abandon(self, waited: float) -> None:
        """The writer's thread is still in a store call (or stuck opening it): what it
        has not written goes to the spool now, as the process is about to end.  The
        locks keep every record in `_queue`, `_retry` or `_in_flight` while it is read,
        and the thread, once it returns, neither puts records back nor writes more."""
        if not self._spill_lock.acquire(timeout=waited):  # a spiller stuck in the spool's fsync
            log.error(
                "the ledger did not answer within %.0fs of shutdown and the spool is busy: %d records not known to be written are lost",
                waited, self.pending,
            )
            return
        try:
            with self._hand_lock:
                self._abandoned = True
                held: list[Record] = []
                seen: set[int] = set()
                # The batch in flight is the oldest (taken off the head of the retry
                # list), and may be in the retry list too for a moment (an outage puts it
                # back before its write ends): each record once.
                for record in [*self._in_flight, *self._retry]:
                    if id(record) not in seen:
                        seen.add(id(record))
                        held.append(record)
                self._retry = []
                held += _pop_all(self._queue)
            if not held:
                return
            if self.spool is None:
                log.error("the ledger did not answer within %.0fs of shutdown and there is no spool: %d records not known to be written are lost", waited, len(held))
                return
            try:
                self.spool.append(held)
            except Exception as exc:  # noqa: BLE001 - any failure: said, with what it costs
                log.error("the ledger did not answer within %.0fs of shutdown and the spool failed (%s: %s): %d records not known to be written are lost", waited, type(exc).__name__, exc, len(held))
                return
            self.stats.spooled += len(held)
            log.error(
                "the ledger did not answer within %.0fs of shutdown: %d records not known to be written spooled to %s, to be replayed at the next start "
                "(any the store writes after all are not written twice)",
                waited, len(held), self.spool.path,
            )
        finally:
            self._spill_lock.release()

    def _open(self, raise_unusable: bool = False) -> bool:
        try:
            self.store.open()
        except Exception as exc:  # after start-up, any failure to open is an outage the thread rides out
            if raise_unusable and isinstance(exc, LedgerUnusable):
                raise
            self._note_error(exc)
            return False
        self._opened = True
        if not self._replayed_at_open:
            # Records a previous run (or an outage before this first open) spooled.  A
            # reopen after a failed write must not read the spool back: during an outage
            # that bounced every spooled record into memory at each retry, past the bound.
            # Nor a first open that comes late, with the queue already long: the flushes
            # take the spool back once it is short again.
            self._replayed_at_open = True
            if self._caught_up():
                self._replay_spool()
        return True

    def _spool_waiting(self) -> bool:
        return self.spool is not None and self.spool.waiting()

    def _replay_spool(self) -> None:
        """Records spooled earlier (an outage, a slow store, a previous run) go back in
        line, ahead of anything newer: half the bound at a time, so that with the queue
        under the other half (`_flush_once`) memory stays within it however large the
        spool.  The spool keeps them until they are written (`Spool.forget_taken`)."""
        if self.spool is None:
            return
        with self._spill_lock:
            # Counted pending from before the spool's count drops until they are in the
            # retry list: a report meanwhile must not find them in neither (an upper
            # bound for a moment: `pending` is never less than the truth).
            self._replaying = at_most = max(1, self.max_pending // 2)
            try:
                spooled = self.spool.take(at_most)
                if spooled:
                    log.info("replaying %d spooled records from %s", len(spooled), self.spool.path)
                    self._retry = spooled + self._retry
            finally:
                self._replaying = 0

    def _note_error(self, exc: Exception) -> None:
        self._store_lost = isinstance(exc, LedgerLost)
        self.stats.write_errors += 1
        self.stats.healthy = False
        message = f"{type(exc).__name__}: {exc}"
        if message != self.stats.last_error:
            log.error("ledger write failed (%s); %d records waiting", message, self.pending)
        self.stats.last_error = message

    def _take_batch(self) -> list[Record]:
        # The batch counts as being written before a record of it leaves the queue or
        # the retry list: `pending` must never dip while it is readied and written
        # (`_write_part`), or a `flush()` begun meanwhile returns before these are written.
        # Each move under `_hand_lock`, the batch in `_in_flight` as its records leave:
        # `close` may give up on this thread and spool what it holds (`_abandon`).
        most = self._batch_at_most
        with self._hand_lock:
            if self._abandoned:
                return []
            if self._retry:
                self._set_writing(min(len(self._retry), most))
                batch, self._retry = self._retry[:most], self._retry[most:]
                self._in_flight = batch
                return batch
            n = min(len(self._queue), most)
            self._set_writing(n)
        batch = []
        if self._preparer is not None and not self._stopping:
            # Serving: taken, minted and encoded on the event loop (meter/ledger/preparing.py).
            # Never at shutdown, so never while `close` may give up on this thread.
            batch = self._preparer.take(n)
        with self._hand_lock:
            if not batch and not self._abandoned:  # no loop, or it did not answer: taken here
                batch = pop_up_to(self._queue, n)
            self._in_flight = batch
        return batch

    def _put_back(self, records: list[Record]) -> None:
        """Records not written go back to the head of the retry list (from the batch in
        flight, which `_write_due` then lets go); not once `close` has spooled them."""
        with self._hand_lock:
            if not self._abandoned:
                self._retry = records + self._retry

    def _flush_once(self, drain: bool = False) -> bool:
        """Write what is due; once caught up, first take back what a slow store made
        the spill thread spool (when draining, until the spool is empty).  False when
        the store failed (records kept)."""
        while True:
            # Caught up: under a store that stays slower than the traffic the spool grows
            # on disk, not in memory.  When draining too: the queue is written first.
            if self._caught_up() and self.stats.healthy and not self._abandoned and self._spool_waiting():
                self._replay_spool()
            ok = self._write_due(drain)
            if ok and not self._retry and self.spool is not None:
                self.spool.forget_taken()  # what was replayed from it is written
            # Draining goes on while the spool has records and the store takes them; a
            # store that is not healthy (nothing was written) leaves them for next time.
            if not ok or not drain or not self.stats.healthy or not self._spool_waiting():
                return ok

    def _caught_up(self) -> bool:
        """Nothing waits for a retry and the queue is under half the bound: half the
        bound may be taken back from the spool."""
        return not self._retry and len(self._queue) < self.max_pending // 2

    def _write_due(self, drain: bool) -> bool:
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
            if not batch and self._abandoned:
                return True  # `close` spooled what was left: nothing more to write
            due -= len(batch)
            self._set_writing(len(batch))
            try:
                outage = self._write_isolating(batch)
            except Exception:
                # Not the store failing (that is handled where it is called): the batch is
                # kept for the next try (see `_run`), written again whole if part of it
                # was: the ledger keeps a row once by its id.
                self._put_back(batch)
                raise
            finally:
                with self._hand_lock:
                    self._in_flight = []
                    self._set_writing(0)
            if outage is not None:
                self._note_error(outage)
                self._spill_overflow()
                self._reopen_later()
                return False
            if not self.stats.healthy:
                log.info("ledger recovered; %d records waiting", self.pending)
            self.stats.healthy = True
            self.stats.last_error = None
            # A slow store: new arrivals past the bound go to the spool; records being
            # retried or replayed stay, they are the ones being written.
            self._spill_overflow(from_retry=False)
        return True

    def _settle_sessions(self, batch: list[Record]) -> Exception | None:
        """What the request path did not know (a response another replica or an earlier
        run recorded): the sessions of chains, and the creators of background responses
        whose usage a retrieve carries (`meter.attribution.resolve_links`).  One query for
        the batch, here in the writer's thread, never on the request path.  An outage is
        returned (the batch waits, unsettled); any other failure leaves each row its own."""
        if isinstance(batch, EncodedBatch) and batch.linked is False:
            return None  # the preparer saw no link to settle: no loop over the batch here
        ask = links_asked(batch, clean_text)
        if ask and isinstance(batch, EncodedBatch):
            batch.chunks = None  # the records change below: encoded again when written
        rows: list[tuple[Any, ...]] = []
        if ask:
            try:
                _, rows = self.store.query(links_query(ask), ask)
            except Exception as exc:  # noqa: BLE001 - failure_kind says whose fault it is
                if failure_kind(exc) == "outage":
                    return exc
                log.warning("could not look up %d earlier responses (%s); the rows that follow them keep their own sessions and attribution", len(ask), type(exc).__name__)
        dropped = resolve_links(batch, rows)
        if dropped:  # a retrieve's own tags past what its row may hold; counted here, as a batch may be sanitised already
            self.stats.truncated[DROPPED_TAG] += dropped
        return None

    def _set_writing(self, n: int) -> None:
        self._writing = n
        self._spill_at = self.max_pending - n - len(self._retry)
        if self._spill_at < len(self._queue):
            self._spill.set()

    def _write_isolating(self, batch: list[Record]) -> Exception | None:
        """Write `batch`, splitting a refused part in halves until the refused records
        are alone; those are set aside.  On an outage, what is not written goes back
        to the head of the retry list and the outage is returned.

        A part fails as refused, too, when meter's own work on it before the store
        (`_write_part`) raises on a record's values: a bug, but one that would fail the
        batch on every retry and hold every later record back for good.  The record
        that fails alone goes to the rejected file with the error, like one the store
        refused, and the rest is written."""
        parts = [batch]
        rejected: list[tuple[Record, Exception]] = []
        try:
            while parts:
                part = parts.pop()
                try:
                    cuts = self._write_part(part)
                except Exception as exc:  # noqa: BLE001 - whatever is raised, failure_kind says whose fault it is
                    kind = failure_kind(exc)
                    if kind == "unknown" and len(part) == 1:
                        kind = self._probe_kind()
                    if kind == "outage":
                        self._put_back(part + [r for p in reversed(parts) for r in p])
                        return exc
                    if len(part) == 1:
                        rejected.append((part[0], exc))
                    else:
                        mid = len(part) // 2
                        parts += [part[mid:], part[:mid]]  # the first half is written first
                    continue
                if cuts is not None:
                    add_cuts(cuts, self.stats.truncated, self.stats.overflows)
                self.stats.written += len(part)
            return None
        finally:
            if rejected:
                self._reject(rejected)

    def _write_part(self, part: list[Record]) -> Cuts | None:
        """Ready `part` for the store and write it: ids, the sanitising step, the
        sessions of its chains, then `Store.write`.  Every step is idempotent, so a part
        is readied again whole when it is retried or split.  An outage of the session
        lookup is raised, as the write's would be."""
        try:
            if not isinstance(part, EncodedBatch):  # the preparer minted its batch's ids on the loop
                mint_ids(part)
            # Off the event loop too, and idempotent: a retried batch is not counted twice.
            # A store that sanitises in its own process (the DuckDB ledger process) answers
            # what it cut instead, and the proxy's GIL is spared the work.
            if not self._store_sanitises:
                sanitise_batch(part, self.stats.truncated, self.stats.overflows)
            outage = self._settle_sessions(part)
        except Exception as exc:
            if failure_kind(exc) == "outage":  # out of memory, say: not these records
                raise
            raise MeterCouldNotPrepare(f"{type(exc).__name__}: {exc}") from exc
        if outage is not None:
            raise outage
        return self.store.write(part)

    def _probe_kind(self) -> str:
        """One record failed with an error that does not say whose fault it is: if the
        store still takes a write that must succeed, the record is the problem."""
        try:
            self.store.probe()
        except Exception:  # noqa: BLE001 - any failure of the probe says "the store"
            return "outage"
        return "refused"

    def _reject(self, rejected: list[tuple[Record, Exception]]) -> None:
        """Set the records of one batch aside, each with its reason, in one append to the
        rejected file (one fsync, however many).  A bug in meter is logged with its
        traceback once per batch: at worst it fails every record, and thousands of
        tracebacks would bury the one line that matters."""
        self.stats.rejected += len(rejected)
        where = self.rejected.path if self.rejected else "the log only"
        bugs = [(record, exc) for record, exc in rejected if isinstance(exc, MeterCouldNotPrepare)]
        if bugs:
            first, bug = bugs[0]
            more = f", and {len(bugs) - 1} more records of this batch for the same or another bug" if len(bugs) > 1 else ""
            log.error("meter could not prepare record %s for the ledger (%s), a bug in meter%s; set aside in %s", first.id, bug, more, where, exc_info=bug.__cause__)
        for record, refusal in rejected:
            if not isinstance(refusal, MeterCouldNotPrepare):
                log.warning("ledger refused record %s (%s: %s); set aside in %s", record.id, type(refusal).__name__, refusal, where)
        if self.rejected is None:
            return
        try:
            self.rejected.append([(record, _reason(exc)) for record, exc in rejected])
        except OSError as err:
            log.error("could not write %d rejected records to %s: %s", len(rejected), self.rejected.path, err)

    def _reopen_later(self) -> None:
        """After a failed write the connection may be unusable (DuckDB invalidates a
        database after an I/O error): close it, and open afresh on the next try."""
        with contextlib.suppress(Exception):  # a broken connection may not close cleanly; it is dropped either way
            self.store.close()
        self._opened = False

    def _spill_overflow(self, from_retry: bool = True) -> None:
        """Bound memory while the store is down or slow: past `max_pending`, the oldest
        records go to the spool until half the bound is left.

        The writer thread calls it with `from_retry` (it owns `_retry`, the oldest
        records); the spill thread without (it takes from the queue alone).  Records
        the spool cannot take go back where they came from, in order.
        """
        if self.spool is None or self.pending <= self.max_pending or time.monotonic() < self._spool_retry_at:
            return
        with self._spill_lock:
            # Down to half the bound, not to the bound: records keep arriving while the
            # spool is fsynced (0.4 s on a busy disk), and spilling only the excess made
            # one fsync per few records, the queue peaking near twice the bound at
            # ~1,000 requests/s (tests/test_fleet.py's outage under load).
            excess = self.pending - self.max_pending // 2
            self._spilling = max(0, excess)  # before any record leaves the queue (see `pending`)
            try:
                self._spill_excess(excess, from_retry)
            finally:
                self._spilling = 0

    def _spill_excess(self, excess: int, from_retry: bool) -> None:
        old: list[Record] = []
        if from_retry and excess > 0 and self._retry:
            take = min(excess, len(self._retry))
            old, self._retry = self._retry[:take], self._retry[take:]
        queued: list[Record] = []
        try:
            while len(old) + len(queued) < excess:
                queued.append(self._queue.popleft())
        except IndexError:
            pass
        spill = old + queued
        # In hand now: counted exactly while the spool takes them (an fsync, 0.4 s on a
        # busy disk), not as the excess, which counts the batch being written and the
        # retry too (the spill thread takes from the queue alone).
        self._spilling = len(spill)
        if not spill:
            return
        try:
            self.spool.append(spill)  # type: ignore[union-attr]
            self.stats.spooled += len(spill)
        except Exception as exc:  # noqa: BLE001 - any failure: the records go back, the spiller lives on
            # `pending` counts `spill` still (as `_spilling`): past the hard bound, the
            # oldest of it (the retry's first, then the queue's) is dropped, not put back.
            lost = max(0, min(len(spill), self._past_hard_bound()))
            if lost:
                from_old = min(lost, len(old))
                old, queued = old[from_old:], queued[lost - from_old :]
            self._queue.extendleft(reversed(queued))
            if old:
                self._retry = old + self._retry
            self._spool_failed(exc, len(spill))
            if lost:
                self._count_dropped(lost)
            return
        if self._spool_failing:
            log.info("the spool %s takes records again: %d spooled", self.spool.path, len(spill))  # type: ignore[union-attr]
        self._spool_failing = False
        self._spool_backoff = 0.0

    def _past_hard_bound(self) -> int:
        """How many records memory holds past `HARD_BOUND` times the bound (0 or less: none)."""
        return self.pending - HARD_BOUND * self.max_pending

    def _drop_past_hard_bound(self) -> None:
        """While the spool's backoff runs (it failed: neither it nor the store takes
        records), the oldest queued records past `HARD_BOUND` times the bound go."""
        excess = self._past_hard_bound()
        if excess <= 0:
            return
        dropped = 0
        with self._spill_lock:  # counted under it too, as the writer thread's drops are
            with contextlib.suppress(IndexError):
                while dropped < excess:
                    self._queue.popleft()
                    dropped += 1
            if dropped:
                self._count_dropped(dropped)

    def _count_dropped(self, n: int) -> None:
        """Counted each time, said at most once every `_DROP_LOG_EVERY` seconds."""
        self.stats.dropped += n
        self._dropped_unlogged += n
        now = time.monotonic()
        if now - self._dropped_logged_at >= _DROP_LOG_EVERY:
            log.error(
                "dropped the %d oldest records waiting for the ledger: neither the ledger nor the spool %s takes them, and "
                "memory holds at most twice --ledger-max-pending (%d in all dropped so far; meter_ledger_dropped_records_total)",
                self._dropped_unlogged, self.spool.path if self.spool is not None else "(none)", self.stats.dropped,
            )
            self._dropped_logged_at, self._dropped_unlogged = now, 0

    def _spool_failed(self, exc: Exception, n: int) -> None:
        """Said once until the spool takes records again; tried again after a backoff."""
        self._spool_backoff = min(self.retry_max_interval, max(self._spool_backoff * 2, self.flush_interval))
        self._spool_retry_at = time.monotonic() + self._spool_backoff
        if not self._spool_failing:
            self._spool_failing = True
            log.error(
                "could not spool %d records (%s: %s): records wait in memory, past --ledger-max-pending and up to twice it "
                "(then the oldest are dropped), until the ledger or the spool takes them (meter_ledger_pending_records); "
                "said again once the spool works",
                n, type(exc).__name__, exc,
            )

    def _run_spiller(self) -> None:
        """While the writer waits on a slow store, records keep arriving: this thread
        spools the oldest queued ones past `max_pending`, so memory stays bounded even
        when no write ever fails."""
        while not self._stopping:
            self._spill.wait()
            # The spool failed lately: not before its backoff, however many records arrive
            # meanwhile (the event stays set, so they do not wake this thread again); but
            # memory stays within twice the bound meanwhile, a flush interval at a time.
            while (remaining := self._spool_retry_at - time.monotonic()) > 0:
                if self._closing.wait(min(remaining, self.flush_interval)):
                    break
                self._drop_past_hard_bound()
            self._spill.clear()
            if self._stopping:
                break
            try:
                self._spill_overflow(from_retry=False)
            except Exception:  # a dead spiller would leave memory unbounded, silently
                log.exception("spilling to the spool failed; trying again at the next record")

    def _run(self) -> None:
        backoff = self.flush_interval
        reopened_at_stop = False
        while True:
            began = time.monotonic()
            stopping = self._stopping
            opened = self._opened or self._open()
            self._start_spiller()
            if not opened:
                ok = False
                self._spill_overflow()  # the store cannot even be opened: memory stays bounded
            else:
                try:
                    ok = self._flush_once(drain=stopping)
                except Exception as exc:  # a dead writer thread would stop the ledger for good, silently
                    log.exception("ledger writer failed; %d records wait for the next try", self.pending)
                    self._note_error(exc)
                    ok = False
            if stopping or self._abandoned:
                if not ok and self._store_lost and not reopened_at_stop and not self._abandoned:
                    # The final flush found the ledger process gone (killed a moment
                    # before): a fresh one takes the records, as during serving, rather
                    # than the spool, which only a next start on this ledger reads.
                    reopened_at_stop = True
                    continue
                if not ok and self.spool is not None and self.pending and not self._abandoned:
                    self._spill_all()
                break
            if ok:
                # Flushes begin a flush interval apart, however long one took: waiting a
                # whole interval after a slow write let a record wait nearly two.
                backoff = self.flush_interval
                self._wake.wait(max(0.0, backoff - (time.monotonic() - began)))
            else:
                backoff = min(self.retry_max_interval, max(backoff * 2, self.flush_interval))
                self._wake.wait(backoff)
            self._wake.clear()
        if self._opened:
            try:
                self.store.close()
            except Exception as exc:  # noqa: BLE001 - the thread is ending; the failure is logged
                log.error("closing the ledger failed: %s", exc)

    def _spill_all(self) -> None:
        with self._spill_lock:  # not while `close` gives up on this thread (`_abandon`)
            with self._hand_lock:
                if self._abandoned:
                    return  # `close` spooled them
                records = self._retry + _pop_all(self._queue)
                self._retry = []
            if not records:
                return
            try:
                self.spool.append(records)  # type: ignore[union-attr]
                self.stats.spooled += len(records)
                log.warning("ledger unavailable at shutdown: %d records spooled to %s", len(records), self.spool.path)  # type: ignore[union-attr]
            except OSError as exc:
                log.error(
                    "the ledger is unavailable at shutdown and the spool %s failed (%s: %s): %d records not written are lost",
                    self.spool.path, type(exc).__name__, exc, len(records),  # type: ignore[union-attr]
                )

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything appended so far is written, set aside or spooled (tests, admin)."""
        deadline = time.monotonic() + timeout
        # `pending` may count a record twice for a moment (a batch is counted before it
        # leaves the queue, a slice at a time on the event loop), never not at all: so
        # no target computed from it, only its zero.
        self._wake.set()
        while time.monotonic() < deadline:
            if self.pending == 0:
                return True
            time.sleep(0.01)
            self._wake.set()
        return False
