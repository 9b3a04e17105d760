"""Batches taken off the writer's queue on the event loop, a slice at a time.

The ledger writer's thread runs beside the event loop under one GIL.  Whatever
Python it runs per record (taking records off the queue, minting their ids,
encoding them for the ledger process) is time a request waits for the GIL,
and on a machine where both threads share a core, for the core: each flush was
a burst of milliseconds that about one request in a hundred sat behind (p99 at
one connection 2.0-2.5 ms against 0.6 without the writer's work).  Done on the
loop itself, `SLICE` records per callback, the same work costs no more CPU and
the loop interleaves it with requests: slices `SLICE_GAP` apart, a request
meets one at most (~0.07 ms).  The writer's thread keeps what blocks: the store's I/O.

If the loop does not run a slice within `LOOP_WAIT` (closed, or stuck), the
writer takes the rest itself, as it did without a loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

from ..record import Record
from .rows import Chunk, EncodedBatch
from .schema import mint_ids

log = logging.getLogger("meter.ledger")

SLICE = 32  # records per callback on the loop: ~0.07 ms of work
SLICES_PER_BATCH = 32
# Seconds between two slices: a request (a stream lasts a millisecond or more here)
# meets one at most.  0.5 ms apart, a streamed request met several: p99 at one
# connection +0.8 ms over bare against +0.2 ms at 2 ms apart (proxy pinned to a core).
# A batch of 3,000 records (32 slices) is then ready in ~70 ms of its 500.
SLICE_GAP = 0.002
LOOP_WAIT = 2.0  # seconds the writer waits for the loop to begin a batch


def pop_up_to(queue: deque[Record], n: int) -> list[Record]:
    """Up to n records off the queue's head (the spill thread may take from it too)."""
    records: list[Record] = []
    try:
        for _ in range(n):
            records.append(queue.popleft())
    except IndexError:
        pass
    return records


class _Take:
    """One batch being taken on the loop; the writer's thread waits on `done`."""

    def __init__(self, n: int, encoded: bool) -> None:
        self.n = n
        # A big batch (a busy proxy) in bigger slices, so that it is ready well within
        # the flush interval; a small one (where latency shows) in SLICE-record ones.
        self.slice = max(SLICE, n // SLICES_PER_BATCH)
        self.batch = EncodedBatch()
        self.batch.chunks = [] if encoded else None
        self.batch.linked = False
        self.unprepared: list[Record] | None = None  # the batch's records, if preparing them failed
        self.lock = threading.Lock()
        self.started = False
        self.cancelled = False
        self.done = threading.Event()


class BatchPreparer:
    """Takes up to n records off `queue` on `loop`, ids minted and (with `encode`)
    encoded, slice by slice (see the module doc).  The slices follow each other on
    the loop, so the writer's thread wakes once per batch, not once per slice:
    each wake-up takes the GIL from the loop for a moment."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: deque[Record], encode: Callable[[Sequence[Record]], list[Chunk]] | None) -> None:
        self.loop = loop
        self.queue = queue
        self.encode = encode

    def take(self, n: int) -> list[Record]:
        """Up to n records, an `EncodedBatch`; none when the loop does not begin within
        `LOOP_WAIT` (closed, or stuck: the caller takes them itself).  Once begun, the
        batch is waited for: records it has taken are in it (a plain list of them if
        preparing them failed)."""
        job = _Take(n, self.encode is not None)
        try:
            self.loop.call_soon_threadsafe(self._step, job)
        except RuntimeError:  # the loop is closed
            return job.batch
        if not job.done.wait(LOOP_WAIT):
            with job.lock:
                if not job.started:
                    job.cancelled = True
                    return job.batch
            job.done.wait()
        return job.batch if job.unprepared is None else job.unprepared

    def _step(self, job: _Take) -> None:
        """On the loop: one slice off the queue's head, then the next slice in a later
        turn of the loop."""
        if not job.started:
            with job.lock:
                if job.cancelled:
                    return
                job.started = True
        queue, batch = self.queue, job.batch
        try:
            records = pop_up_to(queue, min(job.slice, job.n - len(batch)))
            batch.extend(records)  # in the batch before anything below can fail: never lost
            mint_ids(records)
            if not batch.linked:
                batch.linked = any(record.session_of is not None or record.attribution_of is not None for record in records)
            if batch.chunks is not None and records and self.encode is not None:
                batch.chunks.extend(self.encode(records))
        except Exception:  # the writer's thread waits on `done`: it must get its batch
            log.exception("could not prepare %d ledger records on the event loop; the writer takes them as they are", len(batch))
            # As plain records, not a partly encoded batch: the writer mints what has no
            # id yet and the store encodes them (what it does without a loop).
            job.unprepared = list(batch)
            job.done.set()
            return
        if len(batch) < job.n and queue:
            try:
                # Not at the next turn of the loop: a request takes a few turns, and one
                # slice in each added up to most of a millisecond.
                self.loop.call_later(SLICE_GAP, self._step, job)
                return
            except RuntimeError:  # the loop is closing: what was taken goes as it is
                pass
        job.done.set()
