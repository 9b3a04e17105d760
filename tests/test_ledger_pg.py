"""The PostgreSQL ledger against a real PostgreSQL server (tests/pg.py).

Store-level: every column round-trips, a retried batch never double counts,
usage is counted once per response id across replicas writing at the same
moment, values PostgreSQL refuses cannot block the ledger, and a lost server
raises (no password in the message) and is reconnected.  Fleet-level: two
`meter serve` processes on one database count a background response once
however it is polled, and a replica rides out a database outage without
failing a request or losing a record.
"""

# Fixtures imported by name come back as test parameters:

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meter.ledger import LedgerUnavailable, LedgerWriter, PostgresLedgerError, PostgresStore
from meter.record import COLUMNS

from .conftest import ROOT, SECRET_KEY
from .pg import (
    FILL_POSTGRES,
    PostgresServer,
    assert_rows_match,
    bare_record,
    check_streamed_cost_rewrite,
    execute,
    full_record,
    usage_record,
)


def read_rows(url: str, where: str = "true", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    store = PostgresStore(url, migrate=False)
    try:
        names, rows = store.query(f"SELECT * FROM requests WHERE {where} ORDER BY started_at, id", params)
    finally:
        store.close()
    return [dict(zip(names, row)) for row in rows]


def scalar(url: str, sql: str, *params: Any) -> Any:
    store = PostgresStore(url, migrate=False)
    try:
        return store.query(sql, params)[1][0][0]
    finally:
        store.close()


def count_rows(url: str) -> int:
    """Rows in `requests`, 0 before a replica has created the table."""
    try:
        return scalar(url, "SELECT count(*) FROM requests")
    except PostgresLedgerError as exc:
        if "does not exist" in str(exc):
            return 0
        raise


def opened(url: str) -> PostgresStore:
    store = PostgresStore(url)
    store.open()
    return store


# --- store ---------------------------------------------------------------------


def test_round_trip_every_column(pg_url: str) -> None:
    records = [full_record(i) for i in range(3)] + [bare_record(i) for i in range(3)]
    expected = copy.deepcopy(records)
    store = opened(pg_url)
    try:
        store.write(records)
    finally:
        store.close()
    rows = read_rows(pg_url)
    assert_rows_match(expected, rows)


def test_columns_have_the_spec_types(pg_url: str) -> None:
    opened(pg_url).close()
    store = PostgresStore(pg_url, migrate=False)
    try:
        _, rows = store.query(
            "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'requests' ORDER BY ordinal_position"
        )
        _, pk = store.query(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = 'requests'::regclass AND i.indisprimary"
        )
    finally:
        store.close()
    assert [r[0] for r in rows] == list(COLUMNS)
    types = {r[0]: r[1] for r in rows}
    assert types["id"] == "uuid" and pk == [("id",)]
    assert types["started_at"] == types["finished_at"] == "timestamp with time zone"
    assert types["tags"] == "jsonb" and types["status_code"] == "integer"
    assert types["stream"] == types["background"] == "boolean"
    assert {types[c] for c in ("input_tokens", "total_tokens", "web_search_calls", "cache_missed_tokens", "request_bytes")} == {"bigint"}
    assert {types[c] for c in ("ttfb_ms", "ttft_ms", "duration_ms", "upstream_processing_ms")} == {"double precision"}
    assert {types[c] for c in ("model", "path", "cache_status", "trace_id", "key_id")} == {"text"}
    cost = next(r for r in rows if r[0] == "cost_usd")
    assert cost[1:] == ("numeric", 18, 9)


def test_retried_batch_is_written_once(pg_url: str) -> None:
    records = [usage_record(f"resp_retry_{i}", input_tokens=100 + i) for i in range(20)] + [bare_record(i) for i in range(5)]
    store = opened(pg_url)
    try:
        store.write(records)
        # The writer retries the very same batch after a timeout that had in fact committed.
        store.write(records)
        store.write(copy.deepcopy(records))
    finally:
        store.close()
    rows = read_rows(pg_url)
    assert len(rows) == 25 and len({r["id"] for r in rows}) == 25
    assert sum(r["input_tokens"] or 0 for r in rows) == sum(100 + i for i in range(20))
    assert scalar(pg_url, "SELECT count(*) FROM usage_claims") == 20


def test_first_row_of_a_response_keeps_usage(pg_url: str) -> None:
    store = opened(pg_url)
    try:
        first = [usage_record("resp_a"), bare_record(), usage_record("resp_a"), usage_record("resp_b")]
        store.write(first)
        later = [usage_record("resp_b"), usage_record("resp_c")]
        store.write(later)
    finally:
        store.close()
    rows = {str(r["id"]): r for r in read_rows(pg_url)}
    with_usage = [r.id for r in first + later if rows[r.id]["input_tokens"] is not None]
    assert with_usage == [first[0].id, first[3].id, later[1].id]
    # The rows that lost keep their place, and lose every usage column and the cost.
    lost = rows[first[2].id]
    assert lost["response_id"] == "resp_a" and lost["total_tokens"] is None and lost["cost_usd"] is None and lost["status_code"] == 200
    assert later[0].input_tokens is None  # the record the writer holds says the same


def test_foreground_usage_is_not_claimed(pg_url: str) -> None:
    """Only background responses show usage on several rows; others are never cleared."""
    records = [usage_record("resp_fg", background=False, endpoint="responses") for _ in range(2)]
    store = opened(pg_url)
    try:
        store.write(records)
    finally:
        store.close()
    assert [r["input_tokens"] for r in read_rows(pg_url)] == [10, 10]
    assert scalar(pg_url, "SELECT count(*) FROM usage_claims") == 0


def test_usage_counted_once_across_replicas_writing_at_once(pg_url: str) -> None:
    """Two stores (two replicas) write rows for the same response ids in the same instant."""
    stores = [opened(pg_url), opened(pg_url)]
    rounds, ids_per_round = 8, 200
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def replica(n: int) -> None:
        try:
            for r in range(rounds):
                ids = [f"resp_{r}_{i}" for i in range(ids_per_round)]
                if n:
                    ids.reverse()  # opposite order: the claims must not deadlock
                batch = [usage_record(rid, input_tokens=7, key_id=f"replica{n}") for rid in ids]
                barrier.wait()
                stores[n].write(batch)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for store in stores:
        store.close()
    assert not errors, errors
    rows = read_rows(pg_url)
    assert len(rows) == 2 * rounds * ids_per_round
    by_response: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_response.setdefault(row["response_id"], []).append(row)
    assert len(by_response) == rounds * ids_per_round
    for rid, pair in by_response.items():
        assert sorted(r["key_id"] for r in pair) == ["replica0", "replica1"]
        assert [r["input_tokens"] for r in pair].count(7) == 1, rid
    assert sum(r["input_tokens"] or 0 for r in rows) == 7 * rounds * ids_per_round
    assert {r["key_id"] for r in rows if r["input_tokens"]} == {"replica0", "replica1"}  # both won some


def test_values_postgresql_refuses_do_not_block_the_ledger(pg_url: str) -> None:
    odd = full_record(
        model="gpt\x00evil",
        user_id="lone \ud800 surrogate",
        response_id="resp_\x00nul",
        tags=json.dumps({"k\x00": "v\x00"}),
        input_tokens=2**70,
        cost_usd=None,
    )
    fine = full_record(1)
    # The writer's one sanitising step (meter.ledger.sanitise) makes them storable before the store sees them.
    writer = LedgerWriter(PostgresStore(pg_url), flush_interval=0.02)
    writer.start_thread()
    writer.done(None, odd)
    writer.done(None, fine)
    assert writer.flush(10)
    writer.close()
    assert writer.stats.rejected == 0 and writer.stats.overflows["responses"] == 1
    rows = {str(r["id"]): r for r in read_rows(pg_url)}
    assert len(rows) == 2
    assert rows[odd.id]["model"] == "gpt\ufffdevil" and rows[odd.id]["user_id"] == "lone \ufffd surrogate"
    assert rows[odd.id]["input_tokens"] is None and rows[odd.id]["output_tokens"] == 11
    assert json.loads(rows[odd.id]["tags"]) == {"k\ufffd": "v\ufffd"}
    assert rows[fine.id]["model"] == fine.model and rows[fine.id]["input_tokens"] == fine.input_tokens


def test_lost_server_raises_without_password_then_reconnects(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    store = opened(url)
    try:
        store.write([bare_record(0)])
        postgres.stop()
        try:
            with pytest.raises(PostgresLedgerError) as failed:
                store.write([bare_record(1)])
            with pytest.raises(PostgresLedgerError) as refused:  # now not even a connection
                store.write([bare_record(1)])
        finally:
            postgres.start()
        for exc in (failed.value, refused.value):
            text = f"{exc} {exc.__cause__!r} {exc.__context__!r}"
            assert postgres.password not in text and "***" in str(exc)
        store.write([bare_record(2)])  # the same store reconnects
    finally:
        store.close()
    assert len(read_rows(url)) == 2


def test_a_read_after_the_server_restarted_answers(postgres: PostgresServer) -> None:
    """A reader's connection that the server ended while it was idle (a restart, a
    failover, a DBA's pg_terminate_backend) is found dead only when it is next used:
    a report, the console or the budgets' spend read must not fail for it while the
    database is up again."""
    url = postgres.new_database()
    store = opened(url)
    try:
        store.write([bare_record(0)])
        assert store.query("SELECT count(*) FROM requests")[1] == [(1,)]
        postgres.stop()
        postgres.start()
        assert store.query("SELECT count(*) FROM requests")[1] == [(1,)]
        # Ended by hand while idle, as a DBA or a pooler would.
        execute(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'meter' AND pid <> pg_backend_pid()")
        assert store.query("SELECT count(*) FROM requests")[1] == [(1,)]
        postgres.stop()
        try:
            with pytest.raises(PostgresLedgerError):  # a server that is down is still an error, once
                store.query("SELECT count(*) FROM requests")
        finally:
            postgres.start()
    finally:
        store.close()


def test_a_schema_lost_under_a_running_store_is_recreated(pg_url: str) -> None:
    store = opened(pg_url)
    try:
        store.write([bare_record(0)])
        execute(pg_url, "DROP TABLE requests, usage_claims, _meter_migrations CASCADE")
        with pytest.raises(PostgresLedgerError, match="UndefinedTable"):
            store.write([bare_record(1)])
        store.write([bare_record(1)])  # reconnects, migrates, writes
    finally:
        store.close()
    assert len(read_rows(pg_url)) == 1


def test_bad_password_error_names_no_password(postgres: PostgresServer) -> None:
    url = postgres.url.replace(postgres.password, postgres.password[::-1])
    store = PostgresStore(url)
    with pytest.raises(PostgresLedgerError) as exc:
        store.open()
    store.close()
    assert postgres.password[::-1] not in str(exc.value) and "password" in str(exc.value).lower()


def test_query_for_readers(pg_url: str) -> None:
    records = [full_record(i) for i in range(3)]
    store = opened(pg_url)
    try:
        store.write(records)
        names, rows = store.query("SELECT model, count(*) AS requests, sum(cost_usd) AS cost_usd FROM requests WHERE started_at >= to_timestamp($1) GROUP BY model", [records[1].started_at])
        assert names == ["model", "requests", "cost_usd"] and rows == [("gpt-5-2026-01-01", 2, records[0].cost_usd * 2)]
        names, rows = store.query("SELECT id, '?' AS q FROM requests WHERE key_name = $1 AND input_tokens > $2 ORDER BY started_at", ["team-搜索", 0])
        assert names == ["id", "q"] and [str(r[0]) for r in rows] == [r.id for r in records]
        with pytest.raises(PostgresLedgerError):  # reports cannot write by mistake
            store.query("DELETE FROM requests")
        assert len(read_rows(pg_url)) == 3
    finally:
        store.close()
    assert issubclass(PostgresLedgerError, LedgerUnavailable)  # the admin API's 503, by type


def test_streams_and_rewrites_costs_in_bounded_memory(pg_url: str) -> None:
    opened(pg_url).close()
    execute(pg_url, FILL_POSTGRES.format(n=100_000))
    store = PostgresStore(pg_url, migrate=False)
    try:
        check_streamed_cost_rewrite(store, 100_000, batch_rows=1000)
    finally:
        store.close()


def test_reads_never_wait_for_the_writer(pg_url: str) -> None:
    """A report runs on a connection of its own: a write held up (here by a lock on the
    claims table) does not hold up a read of the same store."""
    import asyncpg

    store = opened(pg_url)
    store.write([bare_record(i) for i in range(10)])
    loop = asyncio.new_event_loop()
    blocker = loop.run_until_complete(asyncpg.connect(pg_url))
    loop.run_until_complete(blocker.execute("BEGIN; LOCK TABLE usage_claims IN ACCESS EXCLUSIVE MODE"))
    writer = threading.Thread(target=store.write, args=([usage_record("resp_held")],))
    try:
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive()  # the write waits for the lock
        started = time.monotonic()
        assert store.query("SELECT count(*) FROM requests")[1] == [(10,)]
        assert time.monotonic() - started < 1
    finally:
        loop.run_until_complete(blocker.execute("ROLLBACK"))
        loop.run_until_complete(blocker.close())
        loop.close()
        writer.join(10)
        store.close()
    assert len(read_rows(pg_url)) == 11


def test_insert_rate_50k(pg_url: str) -> None:
    records = [usage_record(f"resp_rate_{i}", key_id="k") for i in range(50_000)]
    store = opened(pg_url)
    try:
        start = time.perf_counter()
        for i in range(0, len(records), 5000):  # the writer's batch size
            store.write(records[i : i + 5000])
        elapsed = time.perf_counter() - start
    finally:
        store.close()
    rate = len(records) / elapsed
    print(f"\nPostgreSQL ledger: {len(records)} records in {elapsed:.2f}s = {rate:,.0f} records/s")
    assert scalar(pg_url, "SELECT count(*) FROM requests") == 50_000
    assert rate > 5_000


# --- meter on a PostgreSQL ledger -------------------------------------------------


async def test_in_process_meter_writes_to_postgres(upstream: Any, start_meter: Any, pg_url: str) -> None:
    meter = await start_meter(upstream.url, ledger=pg_url)
    assert isinstance(meter.meter.store, PostgresStore)
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    async with aiohttp.ClientSession() as http, http.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers=headers) as r:
        assert r.status == 200
        body = await r.json()
    [row] = await meter.rows()
    assert row["response_id"] == body["id"] and row["input_tokens"] is not None and row["key_hint"] == "sk-..." + SECRET_KEY[-4:]


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def replica_args(upstream_url: str, url: str, tmp_path: Path, n: int) -> list[str]:
    return ["--upstream", upstream_url, "--ledger", url, "--spool", str(tmp_path / f"spool{n}.jsonl"), "--flush-interval", "0.2"]


def assert_no_password_in_logs(tmp_path: Path, password: str) -> None:
    logs = sorted(tmp_path.glob("meter*.log"))
    assert logs
    for path in logs:
        assert password not in path.read_text(errors="replace"), path


async def test_two_replicas_count_background_usage_once(upstream: Any, meter_process: Any, postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.new_database()
    replicas = [meter_process(*replica_args(upstream.url, url, tmp_path, n)) for n in range(2)]
    keys = [f"sk-replica-{n}-key" for n in range(2)]  # which replica wrote a row shows in key_hint
    usage = {"x-fake-usage": json.dumps({"input_tokens": 77, "output_tokens": 11, "cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0})}
    ids = []
    async with aiohttp.ClientSession() as http:

        async def call(n: int, method: str, path: str, **kw: Any) -> dict[str, Any]:
            headers = {"Authorization": f"Bearer {keys[n]}", **kw.pop("headers", {})}
            async with http.request(method, replicas[n].url + path, headers=headers, **kw) as r:
                assert r.status == 200
                return await r.json()

        for i in range(4):
            created = await call(i % 2, "POST", "/v1/responses", json={"model": "gpt-4o", "input": "bg", "background": True}, headers={**usage, "x-fake-polls": "2"})
            assert created["status"] in ("queued", "in_progress")
            ids.append(created["id"])
        for rid in ids:
            # Two polls in progress, then both replicas see it completed at the same moment, several times.
            for n in (0, 1):
                await call(n, "GET", f"/v1/responses/{rid}")
            for _ in range(3):
                got = await asyncio.gather(call(0, "GET", f"/v1/responses/{rid}"), call(1, "GET", f"/v1/responses/{rid}"))
                assert [g["status"] for g in got] == ["completed", "completed"]
    expected_rows = len(ids) * (1 + 2 + 6)
    await wait_for(lambda: count_rows(url) == expected_rows, 15, "both replicas' rows")
    rows = read_rows(url)
    for rid in ids:
        mine = [r for r in rows if r["response_id"] == rid]
        completed = [r for r in mine if r["outcome"] == "completed"]
        assert {r["key_hint"] for r in completed} == {"sk-..." + k[-4:] for k in keys}  # both replicas saw the usage
        counted = [r for r in mine if r["input_tokens"] is not None]
        assert len(counted) == 1, rid
        assert counted[0]["input_tokens"] == 77 and sum(r["output_tokens"] or 0 for r in mine) == 11
    assert scalar(url, "SELECT count(*) FROM usage_claims") == len(ids)
    assert_no_password_in_logs(tmp_path, postgres.password)


async def admin_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/readyz") as r:
        return r.status, await r.json()


async def pending_in_metrics(http: aiohttp.ClientSession, url: str) -> float | None:
    """meter_ledger_pending_records from /metrics, or None while there is no metrics module."""
    async with http.get(url + "/metrics") as r:
        if r.status == 404:
            return None
        text = await r.text()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("meter_ledger_pending_records")]
    assert len(values) == 1, "meter_ledger_pending_records missing from /metrics"
    return values[0]


async def test_replica_rides_out_a_database_outage(upstream: Any, meter_process: Any, postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.new_database()
    replica = meter_process(*replica_args(upstream.url, url, tmp_path, 0))
    sent = 0
    async with aiohttp.ClientSession() as http:

        async def one() -> None:
            nonlocal sent
            async with http.post(replica.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers={"Authorization": f"Bearer {SECRET_KEY}"}) as r:
                assert r.status == 200
                await r.read()
            sent += 1

        for _ in range(5):
            await one()
        await wait_for(lambda: count_rows(url) == 5, 10, "rows before the outage")
        postgres.stop()
        try:
            outage_end = time.monotonic() + 3  # writes fail and back off at least three times (0.4, 0.8, 1.6 s)
            saw_failing = False
            while time.monotonic() < outage_end:
                await one()  # forwarding goes on
                status, ready = await admin_json(http, replica.admin_url)
                assert status == 200 and ready["ready"] is True
                if ready["ledger"] == "failing" and ready["ledger_pending_records"] > 0:
                    saw_failing = True
                    assert postgres.password not in json.dumps(ready)
                await asyncio.sleep(0.1)
            assert saw_failing, ready
            pending = await pending_in_metrics(http, replica.admin_url)
            assert pending is None or pending > 0
        finally:
            postgres.start()
        await wait_for(lambda: count_rows(url) == sent, 20, f"all {sent} records after the outage")
        status, ready = await admin_json(http, replica.admin_url)
        deadline = time.monotonic() + 5
        while ready["ledger"] != "ok" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            status, ready = await admin_json(http, replica.admin_url)
        assert ready["ledger"] == "ok" and ready["ledger_pending_records"] == 0
        async with http.get(replica.admin_url + "/metrics") as r:
            metrics = await r.text()
    assert postgres.password not in metrics
    replica.stop()
    assert len({str(r["id"]) for r in read_rows(url)}) == sent
    assert_no_password_in_logs(tmp_path, postgres.password)


def test_serve_help_shows_no_password(postgres: PostgresServer) -> None:
    env = {**os.environ, "METER_LEDGER": postgres.url}
    out = subprocess.run([sys.executable, "-m", "meter", "serve", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and "--ledger" in out.stdout
    assert postgres.password not in out.stdout + out.stderr
