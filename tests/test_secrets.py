"""A raw API key is never written anywhere: ledger, spool, logs, metrics, spans.

One run exercises every place a key could leak at once: keys in all three
headers, a stream, an upstream error, a ledger outage that sends records to the
spool, debug logging, tracing to a real OTLP receiver, and a scrape of /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp

from .otlp_receiver import OTLPReceiver
from .test_faults import flaky_mount  # noqa: F401  (fixture)

KEYS = {
    "Authorization": "Bearer sk-proj-LEAKCHECK-aaaa1111bbbb2222cccc",
    "x-api-key": "sk-ant-LEAKCHECK-dddd3333eeee4444ffff",
    "api-key": "azure-LEAKCHECK-5555666677778888",
}
RAW = [v.removeprefix("Bearer ") for v in KEYS.values()]


def assert_no_key(where: str, blob: bytes | str) -> None:
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    for raw in RAW:
        assert raw.encode() not in data, f"raw key found in {where}"
        assert raw[:-4].encode() not in data, f"most of a raw key found in {where}"


async def test_no_raw_key_anywhere(upstream, start_meter, flaky_mount, tmp_path: Path, monkeypatch, caplog) -> None:  # noqa: F811
    mount, set_full = flaky_mount
    spool = tmp_path / "spool.jsonl"
    caplog.set_level(logging.DEBUG)
    async with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        meter = await start_meter(upstream.url, ledger=str(mount / "ledger.duckdb"), spool=str(spool), ledger_max_pending=5, log_level="debug")
        async with aiohttp.ClientSession() as http:
            async def traffic(tag: str) -> None:
                for header, value in KEYS.items():
                    for body, extra in (
                        ({"model": "gpt-4o", "input": tag}, {}),
                        ({"model": "gpt-4o", "input": tag, "stream": True}, {}),
                        ({"model": "gpt-4o"}, {"x-fake-scenario": "status:401"}),
                    ):
                        headers = {"Content-Type": "application/json", header: value, **extra}
                        async with http.post(meter.url + "/v1/responses", data=json.dumps(body), headers=headers) as r:
                            await r.read()

            await traffic("before")
            await meter.flush()
            set_full(True)  # the ledger's disk is full: records overflow to the spool
            try:
                await traffic("during")
                deadline = asyncio.get_running_loop().time() + 10
                while meter.meter.ledger.stats.spooled == 0 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.1)
                assert meter.meter.ledger.stats.spooled > 0
                assert spool.exists()
                assert_no_key("the spool", spool.read_bytes())
            finally:
                set_full(False)
            async with http.get(meter.admin_url + "/metrics") as r:
                metrics = await r.text()
            async with http.get(meter.admin_url + "/readyz") as r:
                readyz = await r.text()
        await meter.stop()
        await receiver.wait_for(lambda span: True, count=18, timeout=10)  # 9 requests before and 9 during

    assert_no_key("/metrics", metrics)
    assert_no_key("/readyz", readyz)
    assert len(receiver.spans) >= 18
    for span in receiver.spans:
        assert_no_key(f"span {span.name}", json.dumps(span.attributes, default=str) + json.dumps(span.resource, default=str) + span.name)
    assert caplog.records, "debug logging produced nothing to check"
    assert_no_key("the logs", "\n".join(r.getMessage() + str(r.args) for r in caplog.records))
    for path in [*mount.rglob("*"), *tmp_path.rglob("*")]:
        if path.is_file() and path.name != "filler":
            assert_no_key(str(path), path.read_bytes())
