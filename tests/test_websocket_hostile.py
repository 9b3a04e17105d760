"""A hostile WebSocket client cannot make meter miss a response's usage (SPEC §2b).

Only events that can be attributed end a response: an upstream `error` that
names no `stream_id` (the answer to a bogus client message) must not end the
response that is running, whose real terminal event carries the usage.
"""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect as ws_connect

from .conftest import SECRET_KEY
from .test_websocket import AUTH, create, until_terminal, ws_url

USAGE = {"input_tokens": 40000, "cached_tokens": 0, "cache_write_tokens": 0, "output_tokens": 8000, "reasoning_tokens": 0}


async def test_a_bogus_message_mid_response_does_not_dodge_metering(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {**AUTH, "x-fake-deltas": "20", "x-fake-chunk-delay-ms": "20"}
    async with ws_connect(ws_url(meter.url), additional_headers=headers) as ws:
        await ws.send(create(metadata={"fake_usage": USAGE}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "response.created"
        await ws.send(json.dumps({"type": "nonsense"}))  # the upstream answers with an unattributed `error`
        events = []
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            events.append(event)
            if event["type"] == "response.completed":
                break
        errors = [e for e in events if e["type"] == "error"]
        assert errors and "stream_id" not in errors[0]  # the hole's precondition: an error naming no lane
    rows = await meter.rows()
    assert len(rows) == 1
    [row] = rows
    assert row["response_id"] == first["response"]["id"]
    assert row["outcome"] == "completed"
    assert (row["input_tokens"], row["output_tokens"]) == (40000, 8000)
    assert row["cost_usd"] is not None and row["cost_usd"] > 0


async def test_an_error_naming_its_lane_still_ends_that_response(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        await ws.send(create(metadata={"fake_action": "error"}, stream_id="lane-1"))
        [error] = await until_terminal(ws)
        assert error["type"] == "error" and error["stream_id"] == "lane-1"
    [row] = await meter.rows()
    assert (row["outcome"], row["error_code"]) == ("failed", "bad_thing")
    assert SECRET_KEY not in json.dumps(row, default=str)


def test_socket_memory_of_ended_responses_is_bounded_in_bytes() -> None:
    import sys

    from .test_websocket import event, response, socket_meter

    m, sink = socket_meter()
    big = "x" * (1 << 20)
    for i in range(300):
        lane = f"{i:04d}{big}"  # lanes and ids are whatever the peers say they are
        m.on_client(create(stream_id=lane).encode())
        m.on_upstream(event("response.created", lane, response=response(f"resp_{i:04d}{big}")))
        m.on_upstream(event("response.completed", lane, response=response(f"resp_{i:04d}{big}", "completed", {"input_tokens": 1, "output_tokens": 1})))
        sink.records.clear()  # the records leave with the ledger; what the socket keeps is the question
    kept = sum(sys.getsizeof(k) + sys.getsizeof(v[3] or "") for k, v in m.last.items()) + sum(map(sys.getsizeof, m.ended))
    assert kept < (1 << 20), f"the socket keeps {kept >> 20} MiB of lanes and ids"


def test_a_terminal_message_past_the_limit_is_metered_from_its_ends() -> None:
    # A response with generated images easily passes the limit: its usage is still
    # read (from the message's tail), without decoding the whole message again.
    import tracemalloc

    from meter.flow import Addons
    from meter.identity import KeyIdentities
    from meter.observe.socket import SocketMeter
    from meter.websocket import WebSocketRelay

    from .test_websocket import Collect, event, response

    sink = Collect()
    relay = WebSocketRelay("http://upstream.invalid", None, Addons([sink]), KeyIdentities(), max_metered_bytes=1 << 20)  # type: ignore[arg-type]
    from meter.flow import Flow

    template = Flow(method="GET", path="/v1/responses", endpoint="responses", headers={}, transport="websocket")
    m = SocketMeter(relay, template, None, None)
    m.on_client(create(stream_id="img").encode())
    m.on_upstream(event("response.created", "img", response=response("resp_img")))
    image = {"type": "image_generation_call", "result": "A" * (24 << 20)}
    done = event("response.completed", "img", response=response("resp_img", "completed", {"input_tokens": 900, "output_tokens": 4000}, output=[image]))
    assert len(done) > 24 << 20
    tracemalloc.start()
    try:
        m.on_upstream(done)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [rec] = sink.records
    assert (rec.response_id, rec.outcome, rec.input_tokens, rec.output_tokens) == ("resp_img", "completed", 900, 4000)
    assert rec.response_bytes >= len(done)
    assert peak < 8 << 20, f"metering a 24 MiB message took {peak >> 20} MiB"
