"""The DuckDB ledger and its batch writer, on real files."""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from meter.ledger import (
    COLUMN_TYPES,
    HAS_USAGE_SQL,
    ChildProcessStore,
    DuckDBStore,
    LedgerNotOpen,
    LedgerReadError,
    LedgerUnavailable,
    LedgerWriter,
    Spool,
    open_reader,
)
from meter.ledger.schema import random_uuids
from meter.record import COLUMNS, Record

from .conftest import ledger_rows
from .pg import FILL_DUCKDB, check_streamed_cost_rewrite


def make_record(**fields: object) -> Record:
    base: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "started_at": 1_780_000_000.25,
        "finished_at": 1_780_000_001.5,
        "method": "POST",
        "path": "/v1/responses",
        "endpoint": "responses",
    }
    base.update(fields)
    return Record(**base)  # type: ignore[arg-type]


def full_record() -> Record:
    return make_record(
        transport="websocket",
        status_code=200,
        outcome="completed",
        stream=True,
        background=False,
        model_requested="gpt-5",
        model="gpt-5-2025-08-07",
        response_id="resp_abc",
        previous_response_id="resp_prev",
        upstream_request_id="req_1",
        service_tier_requested="auto",
        service_tier="flex",
        input_tokens=1000,
        cached_tokens=400,
        cache_write_tokens=100,
        output_tokens=300,
        reasoning_tokens=200,
        total_tokens=1300,
        web_search_calls=2,
        cache_status="miss:tools_changed",
        cache_missed_tokens=250,
        cost_usd=Decimal("0.001234567"),
        key_id="0123456789abcdef",
        key_hint="sk-...abcd",
        key_name="team-a",
        project="proj_1",
        user_id="user-1",
        tags='{"team":"search"}',
        ttfb_ms=12.5,
        ttft_ms=80.25,
        duration_ms=1250.0,
        upstream_processing_ms=40.0,
        request_bytes=321,
        response_bytes=6543,
        error_type=None,
        error_code=None,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


def test_table_has_exactly_the_spec_columns(tmp_path: Path) -> None:
    store = DuckDBStore(str(tmp_path / "l.duckdb"))
    store.open()
    cols = store.con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'requests' ORDER BY ordinal_position").fetchall()
    store.close()
    assert [c[0] for c in cols] == list(COLUMNS)
    types = dict(cols)
    assert types["id"] == "UUID" and types["started_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["cost_usd"] == "DECIMAL(18,9)" and types["tags"] == "JSON" and types["status_code"] == "INTEGER"
    assert len(COLUMN_TYPES) == 44


def test_every_column_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    store = DuckDBStore(str(path))
    store.open()
    record = full_record()
    sparse = make_record(outcome="upstream_unreachable", status_code=502)
    store.write([record, sparse])
    store.close()
    rows = ledger_rows(path)
    assert len(rows) == 2
    row = next(r for r in rows if str(r["id"]) == record.id)
    for name in COLUMNS:
        value = row[name]
        if name == "id":
            value = str(value)
        elif name in ("started_at", "finished_at"):
            value = value.timestamp()
        assert value == getattr(record, name), name
    empty = next(r for r in rows if str(r["id"]) == sparse.id)
    assert empty["input_tokens"] is None and empty["cost_usd"] is None and empty["tags"] is None


def test_batch_write_is_idempotent_by_id(tmp_path: Path) -> None:
    store = DuckDBStore(str(tmp_path / "l.duckdb"))
    store.open()
    batch = [make_record(input_tokens=i, output_tokens=1, total_tokens=i + 1) for i in range(100)]
    store.write(batch)
    store.write(batch)  # a retried batch
    count, total = store.con.execute("SELECT count(*), sum(input_tokens) FROM requests").fetchone()
    store.close()
    assert count == 100 and total == sum(range(100))


def test_usage_claimed_once_per_response_id_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    store = DuckDBStore(str(path))
    store.open()
    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15, "cost_usd": Decimal("0.5"), "background": True}
    store.write([make_record(response_id="resp_bg", **usage), make_record(response_id="resp_bg", endpoint="responses.retrieve", **usage)])
    store.close()
    again = DuckDBStore(str(path))
    again.open()
    again.write([make_record(response_id="resp_bg", endpoint="responses.retrieve", **usage), make_record(response_id="resp_other", **usage)])
    again.close()
    rows = ledger_rows(path)
    assert len(rows) == 4
    bg = [r for r in rows if r["response_id"] == "resp_bg"]
    assert sum(r["input_tokens"] or 0 for r in bg) == 10
    assert sum(r["cost_usd"] or 0 for r in bg) == Decimal("0.5")
    assert [r["input_tokens"] for r in rows if r["response_id"] == "resp_other"] == [10]


def test_writer_batches_off_thread_and_flushes_on_close(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    writer = LedgerWriter(DuckDBStore(str(path)), flush_interval=0.05, batch_size=1000)
    writer.start_thread()
    t0 = time.perf_counter()
    for i in range(20_000):
        writer.done(None, make_record(input_tokens=1, output_tokens=1, total_tokens=2))
    appended = time.perf_counter() - t0
    writer.close()
    assert appended < 1.0  # appending never waits on the database
    assert writer.stats.written == 20_000
    assert len(ledger_rows(path)) == 20_000


def test_flush_returns_only_when_every_record_handed_over_is_written(tmp_path: Path) -> None:
    """`flush()` (tests, the admin port) counts the batch the writer thread is taking
    from the queue: while it mints ids and sanitises, those records are neither
    queued nor yet written, and a flush called then returned early (15,000 of 20,000)."""
    early = []
    for round_ in range(5):
        writer = LedgerWriter(DuckDBStore(str(tmp_path / f"l{round_}.duckdb")), flush_interval=0.05, batch_size=5000)
        writer.start_thread()
        records = [make_record(input_tokens=1, output_tokens=1, total_tokens=2, id=None) for _ in range(20_000)]
        for record in records:  # every 5,000th wakes the writer: it takes batches meanwhile
            writer.done(None, record)
        assert writer.flush(timeout=30)
        early.append(writer.stats.written)
        writer.close()
    assert early == [20_000] * 5


def test_minted_ids_are_distinct_version_4_uuids() -> None:
    ids = random_uuids(20_000)
    assert len(set(ids)) == 20_000 and random_uuids(0) == []
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122
    marked = random_uuids(2_000, "0123abcd-ef01")  # a budget's mark first, the rest random
    assert len(set(marked)) == 2_000
    for text in marked:
        u = uuid.UUID(text)
        assert text.startswith("0123abcd-ef01-") and str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122


class CountingStore(DuckDBStore):
    """A real DuckDB store that counts the batches it is given."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def write(self, records: list[Record]) -> None:
        self.batches.append(len(records))
        super().write(records)


def test_steady_traffic_is_written_once_per_interval_not_chased(tmp_path: Path) -> None:
    """Records trickling in while a batch is written wait for the next interval:
    writing them at once would mean back-to-back tiny transactions (a busy core)."""
    store = CountingStore(str(tmp_path / "l.duckdb"))
    writer = LedgerWriter(store, flush_interval=0.25, batch_size=5000)
    writer.start_thread()
    t0 = time.perf_counter()
    sent = 0
    while time.perf_counter() - t0 < 1.5:  # about 2,000 records a second
        writer.done(None, make_record(input_tokens=1, output_tokens=1, total_tokens=2))
        sent += 1
        time.sleep(0.0005)
    writer.close()
    assert sum(store.batches) == sent == len(ledger_rows(tmp_path / "l.duckdb"))
    # 1.5 s at one write per 0.25 s is 6 writes, plus the final drain.
    assert len(store.batches) <= 9, store.batches


class FailingStore:
    """A real DuckDB store whose writes fail until `healthy` is set: an outage."""

    def __init__(self, path: str) -> None:
        self.inner = DuckDBStore(path)
        self.healthy = False

    def open(self) -> None:
        self.inner.open()

    def write(self, records: list[Record]) -> None:
        if not self.healthy:
            raise duckdb.IOException("disk unavailable")
        self.inner.write(records)

    def probe(self) -> None:
        self.write([])

    def close(self) -> None:
        self.inner.close()


def test_outage_keeps_records_bounded_then_spools_and_replays(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    spool = tmp_path / "spool.jsonl"
    store = FailingStore(str(path))
    writer = LedgerWriter(store, flush_interval=0.02, batch_size=100, max_pending=500, spool_path=spool, retry_max_interval=0.05)
    writer.start_thread()
    records = [make_record(input_tokens=1, output_tokens=2, total_tokens=3) for _ in range(2000)]
    for r in records:
        writer.done(None, r)
    deadline = time.monotonic() + 5
    while (writer.stats.spooled < 1500 or not writer.stats.write_errors) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.stats.write_errors > 0 and not writer.stats.healthy
    assert writer.pending <= 500  # memory is bounded; the rest went to disk
    assert len(Spool(spool).read()) == writer.stats.spooled >= 1500
    writer.close()  # still failing at shutdown: everything left is spooled, nothing lost
    assert len(Spool(spool).read()) == 2000
    # Next start, the ledger works again: the spool is replayed and removed.
    store2 = FailingStore(str(path))
    store2.healthy = True
    writer2 = LedgerWriter(store2, flush_interval=0.02, spool_path=spool)
    writer2.start_thread()
    writer2.close()
    rows = ledger_rows(path)
    assert sorted(str(r["id"]) for r in rows) == sorted(r.id for r in records)
    assert not spool.exists()


def test_recovery_without_spool_writes_everything_once(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    store = FailingStore(str(path))
    writer = LedgerWriter(store, flush_interval=0.02, batch_size=50, spool_path=tmp_path / "s.jsonl", retry_max_interval=0.05)
    writer.start_thread()
    records = [make_record() for _ in range(300)]
    for r in records:
        writer.done(None, r)
    time.sleep(0.3)
    assert writer.pending == 300 and writer.stats.write_errors >= 1
    store.healthy = True
    assert writer.flush(5)
    writer.close()
    assert writer.stats.healthy
    rows = ledger_rows(path)
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300


def test_the_ledger_process_yields_the_cpu_to_the_proxy(tmp_path: Path) -> None:
    """The DuckDB ledger runs in a child process under SCHED_IDLE (it runs on CPU no one
    else wants and gives way at once to a waking proxy), and writes there."""
    import os

    store = ChildProcessStore(str(tmp_path / "l.duckdb"))
    store.open()
    try:
        assert store._proc is not None
        assert os.sched_getscheduler(store._proc.pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the proxy itself keeps its policy
        store.write([make_record(input_tokens=3, output_tokens=1, total_tokens=4) for _ in range(250)])
    finally:
        store.close()
    rows = ledger_rows(tmp_path / "l.duckdb")
    assert len(rows) == 250 and {r["input_tokens"] for r in rows} == {3}


def test_an_outage_never_reads_the_spool_back_into_memory(tmp_path: Path) -> None:
    # Each retry reopens the store; reading the spool back at every reopen bounced
    # every spooled record into memory again, past --ledger-max-pending.
    store = FailingStore(str(tmp_path / "l.duckdb"))
    writer = LedgerWriter(store, flush_interval=0.01, batch_size=100, max_pending=500, spool_path=tmp_path / "s.jsonl", retry_max_interval=0.02)
    writer.start_thread()
    for _ in range(2000):
        writer.done(None, make_record(input_tokens=1, output_tokens=1, total_tokens=2))
    deadline = time.monotonic() + 5
    while writer.stats.spooled < 1500 and time.monotonic() < deadline:
        time.sleep(0.01)
    highest = 0
    for _ in range(150):  # many retries' worth
        highest = max(highest, writer.pending)
        time.sleep(0.005)
    assert writer.stats.write_errors > 3
    assert highest <= 500 + 100, f"{highest} records in memory during the outage"
    store.healthy = True
    assert writer.flush(10)
    writer.close()
    assert len(ledger_rows(tmp_path / "l.duckdb")) == 2000


# --- reads through the Store protocol ------------------------------------------------


def filled(path: Path, n: int) -> Path:
    store = DuckDBStore(str(path))
    store.open()
    store.con.execute(FILL_DUCKDB.format(n=n))
    store.close()
    return path


def test_has_usage_is_one_rule_in_python_and_sql(tmp_path: Path) -> None:
    store = DuckDBStore(str(tmp_path / "l.duckdb"))
    store.open()
    try:
        records = [
            make_record(input_tokens=i, output_tokens=o, total_tokens=t)
            for i, o, t in itertools.product((None, 1), repeat=3)
        ]
        store.write(records)
        _, rows = store.query(f"SELECT id::VARCHAR, {HAS_USAGE_SQL} FROM requests")
    finally:
        store.close()
    assert dict(rows) == {r.id: r.has_usage for r in records}


def test_duckdb_store_streams_and_rewrites_costs_in_bounded_memory(tmp_path: Path) -> None:
    store = DuckDBStore(str(filled(tmp_path / "l.duckdb", 100_000)))
    store.open()
    try:
        check_streamed_cost_rewrite(store, 100_000, batch_rows=1000)
    finally:
        store.close()


def test_ledger_process_streams_and_rewrites_costs_in_bounded_memory(tmp_path: Path) -> None:
    store = ChildProcessStore(str(filled(tmp_path / "l.duckdb", 100_000)))
    store.open()
    try:
        check_streamed_cost_rewrite(store, 100_000, batch_rows=1000)
        names, rows = store.query("SELECT count(*) AS n FROM requests WHERE started_at >= to_timestamp($1)", [1764000000 + 99_990])
        assert (names, rows) == (["n"], [(10,)])
        stream = store.iter_query("SELECT id FROM requests", batch_rows=10)
        assert len(next(stream)) == 10
        stream.close()  # a reader that stops early releases the child's cursor
        store.write([make_record()])  # and the child goes on serving
    finally:
        store.close()


def test_readers_run_one_read_only_statement(tmp_path: Path) -> None:
    path = filled(tmp_path / "l.duckdb", 3)
    for store in (DuckDBStore(str(path)), ChildProcessStore(str(path))):
        store.open()
        try:
            for sql in ("DELETE FROM requests", "SELECT 1; DELETE FROM requests"):
                with pytest.raises(Exception, match="read-only"):
                    store.query(sql)
            assert store.query("SELECT count(*) FROM requests")[1] == [(3,)]
        finally:
            store.close()
        with pytest.raises(LedgerNotOpen):
            store.query("SELECT 1")
    assert issubclass(LedgerNotOpen, LedgerUnavailable)


def test_open_reader_reads_several_files_as_one(tmp_path: Path) -> None:
    a, b = filled(tmp_path / "a.duckdb", 30), filled(tmp_path / "b.duckdb", 12)
    store = open_reader([str(a), str(b), str(tmp_path / "." / "a.duckdb")])  # the same file twice is one ledger
    try:
        assert store.dialect == "duckdb"
        assert store.query("SELECT count(*) FROM requests")[1] == [(42,)]
        assert [len(batch) for batch in store.iter_query("SELECT id FROM requests", batch_rows=20)] == [20, 20, 2]
    finally:
        store.close()
    writer = open_reader([str(b)], writable=True)
    try:
        assert writer.set_costs([(str(r[0]), None) for r in writer.query("SELECT id FROM requests LIMIT 2")[1]]) == 2
    finally:
        writer.close()
    assert ledger_rows(b)[0]["cost_usd"] is None


def test_open_reader_says_in_one_line_why_it_cannot(tmp_path: Path) -> None:
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    held = filled(tmp_path / "held.duckdb", 1)
    holder = ChildProcessStore(str(held))  # as a running meter holds its file
    holder.open()
    try:
        cases = [
            ([str(tmp_path / "missing.duckdb")], False, "ledger: no such file: "),
            ([str(other)], False, "has no requests table"),
            ([str(other)], True, "has no requests table"),
            (["mysql://u:hunter2@db/x"], False, "a ledger is a DuckDB file or a postgresql:// URL"),
            (["postgresql://u:hunter2@db/x", str(held)], False, "give it alone"),
            # DuckDB names the ledger child; the message names the process that started it.
            ([str(held)], False, f"is open in a running meter, held by meter serve (pid {os.getpid()}); ask the running meter with --url"),
            ([str(held)], True, f"is open in a running meter, held by meter serve (pid {os.getpid()})"),
        ]
        for ledgers, writable, needle in cases:
            with pytest.raises(LedgerReadError) as failed:
                open_reader(ledgers, writable=writable)
            text = str(failed.value)
            assert needle in text and "\n" not in text and "hunter2" not in text, text
            if writable and "running meter" in text:
                assert text.endswith("; stop that meter first")
    finally:
        holder.close()


class CountedEvent(threading.Event):
    """A real Event that counts its `set` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def test_a_queue_past_a_batch_wakes_the_writer_once_not_per_record(tmp_path: Path) -> None:
    """When the ledger falls behind (a slow disk, a machine busy to the last cycle) the
    queue stays past a batch, and each record's `done` used to set the writer's wake-up
    and the spill thread's event again: a lock and a notify per request (~1.5 us live),
    paid exactly when the machine had least to spare.  An event already set is left."""
    writer = LedgerWriter(DuckDBStore(str(tmp_path / "l.duckdb")), flush_interval=0.05, batch_size=100, max_pending=200)
    wake, spill = CountedEvent(), CountedEvent()
    writer._wake, writer._spill = wake, spill  # the thread is not started: nothing takes from the queue
    for _ in range(1_000):
        writer.done(None, make_record())
    assert (wake.sets, spill.sets) == (1, 1)
    wake.clear()  # the writer woke and took a batch; the queue is still long
    writer.done(None, make_record())
    assert wake.sets == 2 and wake.is_set()
