"""Batches taken off the ledger writer's queue on the event loop (meter/ledger/preparing.py)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator

import pytest

from meter.ledger import preparing
from meter.ledger.preparing import BatchPreparer
from meter.ledger.rows import decode_batch, encode_batch
from meter.record import Record, record_row


def record(i: int, session_of: str | None = None) -> Record:
    return Record(id=None, started_at=1.0 + i, finished_at=2.0 + i, method="POST", path="/v1/responses", endpoint="responses",
                  response_id=f"resp_{i}", input_tokens=i, session_of=session_of)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A real event loop running in a thread of its own, as meter serve's is to the writer."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(5)
    running.close()


def test_a_batch_is_taken_minted_and_encoded_on_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    queue = deque(record(i) for i in range(1000))
    on_loop: set[int] = set()

    def encode(records):  # the ledger process's encoding, noting which thread ran it
        on_loop.add(threading.get_ident())
        return encode_batch(records)

    batch = BatchPreparer(loop, queue, encode).take(700)
    assert len(batch) == 700 and len(queue) == 300  # the rest stays queued, in order
    assert [r.response_id for r in batch] == [f"resp_{i}" for i in range(700)]
    assert all(r.id is not None for r in batch) and len({r.id for r in batch}) == 700
    assert batch.chunks is not None and [record_row(r) for r in decode_batch(batch.chunks)] == [record_row(r) for r in batch]
    async def loop_thread() -> int:
        return threading.get_ident()

    assert on_loop == {asyncio.run_coroutine_threadsafe(loop_thread(), loop).result(5)} != {threading.get_ident()}
    assert batch.linked is False
    assert queue[0].response_id == "resp_700" and queue[0].id is None


def test_a_record_following_a_chain_is_noted(loop: asyncio.AbstractEventLoop) -> None:
    queue = deque([record(1), record(2, session_of="resp_0"), record(3)])
    batch = BatchPreparer(loop, queue, None).take(10)
    assert len(batch) == 3 and batch.linked is True and batch.chunks is None


def test_a_closed_loop_takes_nothing(loop: asyncio.AbstractEventLoop) -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    queue = deque(record(i) for i in range(10))
    assert len(BatchPreparer(closed, queue, encode_batch).take(10)) == 0
    assert len(queue) == 10  # the writer takes them itself


def test_a_loop_that_never_runs_the_batch_leaves_the_queue_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preparing, "LOOP_WAIT", 0.2)
    idle = asyncio.new_event_loop()  # never run: a stuck loop
    try:
        queue = deque(record(i) for i in range(10))
        assert len(BatchPreparer(idle, queue, encode_batch).take(10)) == 0
        idle.run_until_complete(asyncio.sleep(0.05))  # it runs at last: the batch was called off
        assert len(queue) == 10
    finally:
        idle.close()


def test_a_failure_on_the_loop_still_hands_the_writer_its_batch(loop: asyncio.AbstractEventLoop) -> None:
    """A slice that fails on the loop (its encoding here, as a MemoryError would) must not
    leave the writer's thread waiting on the batch for ever, the ledger stopped: the batch
    comes back with every record taken, as plain records for the writer and the store to
    finish, never with a partial encoding that would drop rows silently."""
    queue = deque(record(i) for i in range(100))

    def encode(records):  # type: ignore[no-untyped-def]
        raise MemoryError("no memory left for the encoding")

    taken: list[list[Record]] = []
    writer_thread = threading.Thread(target=lambda: taken.append(BatchPreparer(loop, queue, encode).take(100)), daemon=True)
    writer_thread.start()
    writer_thread.join(10)
    assert not writer_thread.is_alive(), "the writer's thread is still waiting for its batch"
    (batch,) = taken
    assert len(batch) > 0 and len(batch) + len(queue) == 100  # nothing lost
    assert [r.response_id for r in batch] == [f"resp_{i}" for i in range(len(batch))]
    assert getattr(batch, "chunks", None) is None  # the store encodes the records itself


async def test_a_serving_writer_writes_a_batch_whose_preparing_failed(tmp_path) -> None:
    """End to end: the ledger process's encoding fails once on the loop; the writer gets
    that batch as records, mints and sends them, and every record is written once."""
    from meter.ledger import ChildProcessStore, LedgerWriter

    from .conftest import ledger_rows

    class FailingOnce(ChildProcessStore):
        failures = 1

        def encode(self, records):  # type: ignore[no-untyped-def,override]
            if self.failures:
                self.failures -= 1
                raise MemoryError("no memory left for the encoding")
            return encode_batch(records)

    writer = LedgerWriter(FailingOnce(str(tmp_path / "l.duckdb")), flush_interval=0.05)
    await writer.start()
    try:
        for i in range(500):
            writer.done(None, record(i))
        assert await asyncio.get_running_loop().run_in_executor(None, writer.flush, 20)
    finally:
        await writer.stop()
    rows = ledger_rows(tmp_path / "l.duckdb")
    assert writer.stats.written == 500 and len(rows) == 500 and len({row["id"] for row in rows}) == 500


async def test_a_serving_writer_flushes_everything_it_was_handed(tmp_path) -> None:
    """With the loop taking the batches, a batch is counted as pending before its records
    leave the queue: flush() waited for a target that counted them twice and gave up
    after its timeout (30 s, False) with every record written."""
    from meter.ledger import ChildProcessStore, LedgerWriter

    from .conftest import ledger_rows

    writer = LedgerWriter(ChildProcessStore(str(tmp_path / "l.duckdb")), flush_interval=0.5)
    await writer.start()
    try:
        for i in range(20_000):
            writer.done(None, record(i))
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await loop.run_in_executor(None, writer.flush, 30)
        assert loop.time() - began < 10 and writer.stats.written == 20_000 and writer.pending == 0
    finally:
        await writer.stop()
    assert len(ledger_rows(tmp_path / "l.duckdb")) == 20_000


class Text(str):
    """Text of a type marshal refuses."""


def test_a_chunk_marshal_refuses_crosses_as_a_pickle() -> None:
    """A value of a type marshal cannot write (a str subclass here; meter makes none)
    must not lose its chunk: it goes as a pickle and comes back equal."""
    odd = record(1)
    odd.model = Text("gpt-4o")
    records = [record(0), odd, record(2)]
    chunks = encode_batch(records)
    assert [kind for kind, _ in chunks] == ["p"]
    assert [record_row(r) for r in decode_batch(chunks)] == [record_row(r) for r in records]
    assert [kind for kind, _ in encode_batch([record(0)])] == ["m"]
