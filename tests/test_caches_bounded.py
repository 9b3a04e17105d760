"""Caches keyed by values from outside are bounded in bytes, not only in entries (SPEC §2b).

A response id is whatever the upstream (or whoever answers in its place) says it
is; a thousand-entry cache of megabyte ids is a gigabyte.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from meter.enrich import CountUsageOnce
from meter.record import Record

from .conftest import SECRET_KEY, free_port

BIG = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def settled(session: aiohttp.ClientSession, admin_url: str) -> None:
    """Until the ledger holds nothing pending (each record has been written and let go)."""
    for _ in range(300):
        async with session.get(admin_url + "/metrics") as r:
            text = await r.text()
        pending = [line for line in text.splitlines() if line.startswith("meter_ledger_pending_records ")]
        if pending and float(pending[0].split()[1]) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the ledger never caught up")


async def resting_rss(pid: int, seconds: float = 2.0) -> int:
    """The lowest RSS over a quiet moment: what is kept, not a transient buffer."""
    lowest = rss_bytes(pid)
    for _ in range(int(seconds / 0.1)):
        await asyncio.sleep(0.1)
        lowest = min(lowest, rss_bytes(pid))
    return lowest


async def start_big_id_upstream() -> tuple[web.AppRunner, str]:
    """An upstream whose every response carries a fresh 1 MiB id and usage."""
    counter = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal counter
        await request.read()
        counter += 1
        rid = "resp_" + f"{counter:08d}" * (BIG // 8)
        body = {"id": rid, "object": "response", "status": "completed", "model": "gpt-4o",
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/responses", create)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_megabyte_response_ids_do_not_stay_in_memory(meter_process, tmp_path) -> None:
    runner, upstream_url = await start_big_id_upstream()
    try:
        meter = meter_process("--upstream", upstream_url, "--ledger", str(tmp_path / "l.duckdb"))
        headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
        body = b'{"model":"gpt-4o","input":"hi"}'
        async with aiohttp.ClientSession() as s:
            async def one() -> None:
                async with s.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
                    assert r.status == 200
                    assert len(await r.read()) > BIG

            for _ in range(5):  # warm up: imports, pools, the first ledger batch
                await one()
            await settled(s, meter.admin_url)
            before = await resting_rss(meter.proc.pid)
            for _ in range(300):
                await one()
            await settled(s, meter.admin_url)
            grown = await resting_rss(meter.proc.pid) - before
        # 300 ids of 1 MiB each: kept, they would be 300 MiB or more.
        assert grown < 100 * BIG, f"meter kept {grown / BIG:.0f} MiB after 300 responses with 1 MiB ids"
    finally:
        await runner.cleanup()


def usage_record(rid: str, background: bool = True) -> Record:
    return Record(id=None, started_at=0.0, finished_at=0.0, method="POST", path="/v1/responses", endpoint="responses",
                  response_id=rid, input_tokens=1, output_tokens=1, total_tokens=2, background=background)


def test_count_usage_once_is_bounded_in_bytes() -> None:
    once = CountUsageOnce(max_ids=200_000, max_bytes=4 * BIG)
    for i in range(100):
        rec = usage_record(f"resp_{i:04d}" + "x" * BIG)
        once.done(None, rec)
    assert once.held_bytes <= 4 * BIG
    # Short, real ids still count once.
    a, b = usage_record("resp_a"), usage_record("resp_a")
    once.done(None, a)
    once.done(None, b)
    assert a.input_tokens == 1 and b.input_tokens is None


def test_count_usage_once_keeps_no_foreground_ids() -> None:
    """Only a background response's usage shows again (on its retrievals); a foreground
    one's retrievals are cleared by endpoint, so its id is not worth keeping."""
    once = CountUsageOnce()
    for i in range(10_000):
        once.done(None, usage_record(f"resp_{i:06d}", background=False))
    assert once.held_bytes == 0
    retrieved = usage_record("resp_000001", background=False)
    retrieved.endpoint = "responses.retrieve"
    once.done(None, retrieved)
    assert retrieved.input_tokens is None


def test_key_identities_do_not_keep_long_keys() -> None:
    # A key header may be 64 KiB; 10,000 remembered ones would be 640 MiB.
    from meter.identity import KeyIdentities, key_id

    identities = KeyIdentities()
    for i in range(2000):
        key = f"sk-{i:05d}" + "k" * (32 << 10)
        assert identities.lookup(key)[0] == key_id(key)
    real = "sk-proj-" + "a" * 156
    assert identities.lookup(real) == identities.lookup(real)
    held = sum(len(k) for k in identities._cache)  # what the cache holds is the point
    assert held < (1 << 20), f"the key cache holds {held >> 20} MiB of keys"
