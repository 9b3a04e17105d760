"""WebSocket mode (SPEC §2a), what a second look found: a socket meter itself
closes, or an upstream closes without a status, is recorded as what it was; a
lane written with escapes is still one lane; a socket meter does not meter still
records the bytes it relayed.

Real parts throughout: meter's own server, the fake provider's WebSocket (or a
small aiohttp upstream for what the fake cannot send), a `websockets` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from .test_websocket import AUTH, create, ws_url

SLOW = {**AUTH, "x-fake-deltas": "40", "x-fake-chunk-delay-ms": "20"}


async def test_a_message_past_the_limit_is_meters_refusal_not_the_clients_hang_up(upstream, start_meter) -> None:
    """A client message past --max-request-bytes makes meter close the socket (1009):
    the response in flight is cut by meter, as a body past it over HTTP is a 413, and
    its row says so rather than blaming the client."""
    meter = await start_meter(upstream.url, max_request_bytes=2000)
    async with ws_connect(ws_url(meter.url), additional_headers=SLOW) as ws:
        await ws.send(create())
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "response.created"
        await ws.send(json.dumps({"type": "response.create", "input": "x" * 4000}))
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosedError:
            pass
        assert ws.close_code == 1009
    [row] = await meter.rows()
    assert (row["outcome"], row["error_type"], row["error_code"]) == ("error", "meter_proxy_error", "request_too_large")


async def test_an_upstream_close_without_a_status_is_recorded_as_no_status(start_meter) -> None:
    """A close frame with no code is RFC 6455's 1005 ("no status received"): the
    response it cut names that code, not a 0 that is no close code at all."""
    from aiohttp import WSMsgType, web

    from .socket_server import serving

    async def answer_then_close_without_status(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the response.create
        created = {
            "type": "response.created",
            "response": {"id": "resp_cut", "object": "response", "status": "in_progress", "model": "gpt-4o"},
        }
        await ws.send_str(json.dumps(created))
        await ws.send_frame(b"", WSMsgType.CLOSE)  # a close frame with an empty body
        await asyncio.sleep(0.5)  # the peer's close answer ends it
        return ws

    app = web.Application()
    app.router.add_get("/v1/responses", answer_then_close_without_status)
    async with serving(app) as port:
        meter = await start_meter(f"http://127.0.0.1:{port}")
        async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
            await ws.send(create())
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "response.created"
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        [row] = await meter.rows()
    assert (row["response_id"], row["outcome"], row["error_type"]) == ("resp_cut", "error", "upstream_disconnected")
    assert row["error_code"] == "1005"


def test_a_lane_the_upstream_writes_with_escapes_still_gets_its_deltas() -> None:
    """Lanes are compared as the strings they spell: an upstream that writes a lane
    `"\\u00e9"` (Python's json.dumps does) names lane "é" in every event, deltas included,
    while another lane runs beside it."""
    from .test_websocket import response, socket_meter

    def escaped(kind: str, lane: str, **fields: object) -> bytes:
        return json.dumps({"type": kind, "sequence_number": 1, **fields, "stream_id": lane}).encode()  # ensure_ascii

    m, sink = socket_meter()
    for lane in ("é", "a"):
        m.on_client(
            json.dumps({"type": "response.create", "model": "gpt-4o", "input": "hi", "stream_id": lane}, ensure_ascii=False).encode()
        )
    sent = {"é": 0, "a": 0}
    for lane, message in [
        ("é", escaped("response.created", "é", response=response("resp_e"))),
        ("a", escaped("response.created", "a", response=response("resp_a"))),
        ("é", escaped("response.output_text.delta", "é", delta="x" * 50)),
        ("a", escaped("response.output_text.delta", "a", delta="y")),
        ("é", escaped("response.output_text.done", "é", text="x" * 50)),
        ("é", escaped("response.completed", "é", response=response("resp_e", "completed", {"input_tokens": 3, "output_tokens": 2}))),
        ("a", escaped("response.completed", "a", response=response("resp_a", "completed", {"input_tokens": 1, "output_tokens": 1}))),
    ]:
        assert b"\\u00e9" in message or lane == "a"
        m.on_upstream(message)
        sent[lane] += len(message)
    e, a = sink.records
    assert (e.response_id, e.input_tokens, e.output_tokens) == ("resp_e", 3, 2)
    assert e.ttft_ms is not None
    assert (e.response_bytes, a.response_bytes) == (sent["é"], sent["a"])


async def test_a_socket_on_another_path_records_the_bytes_it_relayed(start_meter) -> None:
    """A socket meter does not meter (not the Responses API) is one row: its
    request_bytes and response_bytes are the messages relayed each way, as a
    request's are its body and answer; they were 0 however much went through."""
    from aiohttp import WSMsgType, web

    from .socket_server import serving

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await ws.send_frame(msg.data if msg.type is WSMsgType.BINARY else msg.data.encode(), msg.type)
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str("and one more")  # the answer is not a copy of the request
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", echo)
    sent: list[str | bytes] = ["hello", b"\x00\x01\x02", json.dumps({"type": "session.update"})]
    async with serving(app) as port:
        meter = await start_meter(f"http://127.0.0.1:{port}")
        async with ws_connect(ws_url(meter.url, "/v1/realtime"), additional_headers=AUTH) as ws:
            received = []
            for message in sent:
                await ws.send(message)
                received.append(await asyncio.wait_for(ws.recv(), 5))
                if isinstance(message, str):
                    received.append(await asyncio.wait_for(ws.recv(), 5))
        [row] = await meter.rows()

    def size(message: str | bytes) -> int:
        return len(message.encode() if isinstance(message, str) else message)

    assert (row["endpoint"], row["outcome"]) == ("other", "completed")
    assert row["request_bytes"] == sum(map(size, sent)) > 0
    assert row["response_bytes"] == sum(map(size, received)) > row["request_bytes"]
