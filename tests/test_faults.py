"""Faults: meter is never the reason a call failed, and every request has exactly one row.

Real processes throughout: the fake provider misbehaves on request, clients hang
up, the ledger's file system goes read-only (a tmpfs remounted), meter is killed.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from .conftest import SECRET_KEY, ledger_rows

JSON = {"Content-Type": "application/json"}


async def post(http: aiohttp.ClientSession, url: str, body: dict | bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url + "/v1/responses", data=data, headers={**JSON, **(headers or {})}) as r:
        return r.status, await r.read()


async def read_or_error(http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict) -> tuple[int | None, bytes, str | None]:
    """What a client gets: status, the bytes it could read, and the error that cut them."""
    got = b""
    status = None
    try:
        async with http.post(url + "/v1/responses", data=json.dumps(body), headers={**JSON, **headers}) as r:
            status = r.status
            async for chunk in r.content.iter_any():
                got += chunk
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        return status, got, type(exc).__name__
    return status, got, None


async def test_upstream_reset_mid_stream(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as http:
        direct = await read_or_error(http, upstream.url, {"x-fake-scenario": "reset-mid-stream"}, {"model": "gpt-4o", "stream": True})
        through = await read_or_error(http, meter.url, {"x-fake-scenario": "reset-mid-stream"}, {"model": "gpt-4o", "stream": True})
        assert direct[2] is not None and through[2] is not None  # both see a broken stream, not a clean end
        # The same bytes before the break (the fake mints a fresh id per call, same length).
        assert len(through[1]) == len(direct[1]) > 0
        assert re.findall(rb"event: (\S+)", through[1]) == re.findall(rb"event: (\S+)", direct[1])
        assert (await post(http, meter.url, {"model": "gpt-4o"}))[0] == 200  # meter keeps serving
    rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["error", "completed"]
    assert rows[0]["error_type"] == "upstream_disconnected" and rows[0]["input_tokens"] is None


async def test_upstream_stalls_past_the_timeout(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, upstream_timeout=1.0)
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        status, got, error = await read_or_error(http, meter.url, {"x-fake-scenario": "stall", "x-fake-stall-s": "30"}, {"model": "gpt-4o", "stream": True})
        assert status == 200 and b"response.created" in got and error is not None
        assert time.monotonic() - t0 < 10
        status, body = await post(http, meter.url, {"model": "gpt-4o"}, {"x-fake-scenario": "stall-before-headers", "x-fake-stall-s": "30"})
        assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["upstream_timeout", "upstream_timeout"]


@pytest.mark.parametrize("scenario", ["truncated-json", "non-utf8", "no-terminal", "big-body"])
async def test_bad_upstream_bodies_relayed_exactly_and_recorded(upstream, start_meter, scenario: str) -> None:
    meter = await start_meter(upstream.url)
    stream = scenario == "no-terminal"
    body = {"model": "gpt-4o", "stream": stream}
    headers = {"x-fake-scenario": scenario, "x-fake-usage": json.dumps({"input_tokens": 10, "output_tokens": 2})}
    async with aiohttp.ClientSession() as http:
        direct = await read_or_error(http, upstream.url, headers, body)
        through = await read_or_error(http, meter.url, headers, body)
    assert through[0] == direct[0] and len(through[1]) == len(direct[1]) and (through[2] is None) == (direct[2] is None)
    if scenario == "non-utf8":
        assert through[1] == direct[1]
    [row] = await meter.rows()
    if scenario == "truncated-json":
        assert row["outcome"] == "error" and row["error_type"] == "upstream_disconnected" and row["input_tokens"] is None
    elif scenario == "non-utf8":
        # A model call answered whole whose usage meter cannot read is unmetered: counted, never silent.
        assert row["outcome"] == "completed" and (row["error_type"], row["error_code"]) == ("unmetered", "unreadable_response")
        assert row["input_tokens"] is None
    elif scenario == "no-terminal":
        assert row["outcome"] == "error" and row["input_tokens"] is None and row["response_id"] is not None
    else:
        assert len(through[1]) > 10 * 1024 * 1024
        assert row["outcome"] == "completed" and row["input_tokens"] == 10 and row["response_bytes"] == len(through[1])


async def test_clients_hang_up_at_random_points(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    rng = random.Random(7)
    n = 40

    async def one(i: int) -> str:
        cut = rng.randint(0, 4000)
        headers = {**JSON, "x-fake-deltas": "60", "x-fake-chunk-delay-ms": "5"}
        async with aiohttp.ClientSession() as http:
            r = await http.post(meter.url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "stream": True}), headers=headers)
            got = 0
            async for chunk in r.content.iter_any():
                got += len(chunk)
                if got >= cut:
                    r.close()
                    return "cut"
            return "whole"

    results = await asyncio.gather(*(one(i) for i in range(n)))
    async with aiohttp.ClientSession() as http:
        assert (await post(http, meter.url, {"model": "gpt-4o"}))[0] == 200
    rows = await meter.rows()
    assert len(rows) == n + 1  # exactly one row each
    by_outcome = [r["outcome"] for r in rows[:-1] if r["outcome"] != "completed"]
    assert set(by_outcome) <= {"client_disconnected"}
    assert len(by_outcome) >= results.count("cut") - 3  # a cut after the last byte is a completed request
    for row in rows:
        if row["outcome"] == "client_disconnected":
            assert row["input_tokens"] is None
        else:
            assert row["input_tokens"] is not None


async def test_500_concurrent_streams(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one(i: int) -> bytes:
            usage = json.dumps({"input_tokens": 100 + i, "output_tokens": 10})
            async with http.post(meter.url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "stream": True}), headers={**JSON, "x-fake-usage": usage, "x-fake-deltas": "20"}) as r:
                assert r.status == 200
                return await r.read()

        bodies = await asyncio.gather(*(one(i) for i in range(500)))
    assert all(b"response.completed" in b for b in bodies)
    rows = await meter.rows()
    assert len(rows) == 500
    assert all(r["outcome"] == "completed" for r in rows)
    assert sum(r["input_tokens"] for r in rows) == sum(100 + i for i in range(500))


async def test_bad_requests_are_forwarded_and_recorded(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("/v1/responses", b'{"model": "gpt-4o", "input": ', JSON),  # invalid JSON
        ("/v1/responses", b"model=gpt-4o", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("/v1/responses", b"{}", {**JSON, "X-Huge": "h" * 20_000}),
        ("/v1/no/such/path", b"{}", JSON),
        ("/v1/responses", b'{"model": "gpt-4o"}', JSON),  # no key at all
    ]
    async with aiohttp.ClientSession() as http:
        for path, body, headers in cases:
            answers = []
            for base in (upstream.url, meter.url):
                async with http.post(base + path, data=body, headers=headers) as r:
                    answers.append((r.status, await r.read()))
            assert answers[0][0] == answers[1][0]
            assert json.loads(answers[0][1]).keys() == json.loads(answers[1][1]).keys()
    rows = await meter.rows()
    assert [r["status_code"] for r in rows] == [400, 400, 200, 404, 200]
    assert [r["outcome"] for r in rows] == ["error", "error", "completed", "error", "completed"]
    assert rows[0]["error_type"] == "invalid_request_error" and rows[0]["model_requested"] is None
    assert all(r["key_id"] is None for r in rows)


async def test_http10_client(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    host, port = meter.meter.proxy_address
    body = b'{"model": "gpt-4o", "stream": true}'
    request = b"POST /v1/responses HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def exchange() -> bytes:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(request)
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    return b"".join(chunks)
                chunks.append(data)

    raw = await asyncio.get_running_loop().run_in_executor(None, exchange)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"chunked" not in head.lower()  # HTTP/1.0 has no chunked encoding: the stream ends at close
    assert b"response.completed" in payload
    [row] = await meter.rows()
    assert row["outcome"] == "completed" and row["input_tokens"] is not None


@pytest.fixture
def flaky_mount(tmp_path: Path):
    """A small tmpfs that can be filled to the last byte (ENOSPC) and freed again."""
    mount = tmp_path / "ledger-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"this test needs to mount a tmpfs (run as root): {done.stderr.strip()}"
    filler = mount / "filler"

    def set_full(full: bool) -> None:
        if not full:
            filler.unlink(missing_ok=True)
            return
        with open(filler, "wb", buffering=0) as f:  # unbuffered: ENOSPC surfaces at write
            for size in (1 << 20, 4096, 1):  # down to the last byte
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass

    yield mount, set_full
    filler.unlink(missing_ok=True)
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def metric_value(admin_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(admin_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


async def test_ledger_outage_loses_nothing(upstream, start_meter, flaky_mount, tmp_path: Path) -> None:
    mount, set_full = flaky_mount
    ledger = mount / "ledger.duckdb"
    meter = await start_meter(upstream.url, ledger=str(ledger), spool=str(tmp_path / "spool.jsonl"))
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    ids = []
    for _ in range(20):
        ids.append((await client.responses.create(model="gpt-4o", input="before")).id)
    await meter.flush()
    set_full(True)
    try:
        # The first records after the fill may still fit in a page the WAL already
        # holds; probe until the ledger has failed a write, so the outage is certain.
        deadline = time.monotonic() + 20
        while await metric_value(meter.admin_url, "meter_ledger_write_errors_total") < 1:
            assert time.monotonic() < deadline, "the full disk never failed a ledger write"
            ids.append((await client.responses.create(model="gpt-4o", input="probe")).id)
            await asyncio.sleep(0.1)
        for _ in range(60):  # forwarding goes on while the ledger cannot be written
            ids.append((await client.responses.create(model="gpt-4o", input="during")).id)
        await asyncio.sleep(1.0)
        assert await metric_value(meter.admin_url, "meter_ledger_pending_records") >= 60
        assert await metric_value(meter.admin_url, "meter_ledger_write_errors_total") >= 1
        async with aiohttp.ClientSession() as http, http.get(meter.admin_url + "/readyz") as r:
            ready = await r.json()
            assert r.status == 200 and ready["ledger"] == "failing"
    finally:
        set_full(False)
    for _ in range(20):
        ids.append((await client.responses.create(model="gpt-4o", input="after")).id)
    deadline = time.monotonic() + 20
    while meter.meter.ledger.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await metric_value(meter.admin_url, "meter_ledger_pending_records") == 0
    await meter.stop()
    rows = ledger_rows(ledger)
    assert sorted(r["response_id"] for r in rows) == sorted(ids)  # every request exactly once


async def test_sigkill_loses_at_most_the_last_flush_interval(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.duckdb"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--flush-interval", "0.5")
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    finished: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            try:
                r = await client.responses.create(model="gpt-4o", input="x")
            except openai.APIConnectionError:
                return
            finished.append((r.id, time.monotonic()))

    tasks = [asyncio.create_task(traffic()) for _ in range(4)]
    await asyncio.sleep(3)
    killed_at = time.monotonic()
    proc.signal(signal.SIGKILL)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    proc.wait()
    must_have = {rid for rid, t in finished if t < killed_at - 1.0}
    assert len(must_have) > 20
    again = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    again.stop()
    present = {r["response_id"] for r in ledger_rows(ledger)}
    assert must_have <= present
    assert len(present) <= len(finished) + 4
