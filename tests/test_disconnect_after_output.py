"""A client that reads a stream to the end of its output and hangs up has the
whole answer, which the provider bills: meter reads on (relaying nothing) for at
most 2 s to record the terminal event's usage (SPEC §2, the disconnect rule)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from .conftest import SECRET_KEY

HEADERS = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}


async def read_events_until(response: aiohttp.ClientResponse, name: bytes) -> list[bytes]:
    seen = []
    while True:
        event = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        seen.append(event)
        if event.startswith(b"event: " + name):
            return seen


async def test_hangup_after_the_output_still_records_the_usage(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    usage = {"input_tokens": 900, "output_tokens": 300}
    headers = {**HEADERS, "x-fake-deltas": "5", "x-fake-chunk-delay-ms": "150", "x-fake-usage": json.dumps(usage)}
    body = {"model": "gpt-4o", "stream": True, "input": "hi"}
    async with aiohttp.ClientSession() as http:
        r = await http.post(meter.url + "/v1/responses", data=json.dumps(body), headers=headers)
        seen = await read_events_until(r, b"response.output_item.done")
        assert not any(e.startswith(b"event: response.completed") for e in seen)
        started = time.monotonic()
        r.close()  # the client has the whole answer and goes; the terminal event is still to come
    await asyncio.sleep(1.0)
    [row] = await meter.rows()
    assert row["outcome"] == "client_disconnected"
    assert (row["input_tokens"], row["output_tokens"]) == (900, 300)
    assert row["cost_usd"] is not None
    assert time.monotonic() - started < 3


async def test_hangup_mid_output_still_cancels_at_once(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {**HEADERS, "x-fake-deltas": "50", "x-fake-chunk-delay-ms": "100"}
    async with aiohttp.ClientSession() as http:
        r = await http.post(meter.url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "stream": True}), headers=headers)
        await read_events_until(r, b"response.output_text.delta")
        r.close()
    await asyncio.sleep(0.5)
    [row] = await meter.rows()
    assert row["outcome"] == "client_disconnected" and row["input_tokens"] is None
    assert row["duration_ms"] < 2500
