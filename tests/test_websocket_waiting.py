"""`response.create` messages the upstream has not answered yet are bounded per socket.

meter keeps a flow (its facts, tags, clock) for every `response.create` it relayed
until the upstream answers it with `response.created` or an `error`.  A client that
sends creates faster than the upstream answers them (a few dozen bytes each, while
meter holds about a kilobyte for each) would otherwise grow meter's memory with the
upstream's backlog.  Past `MAX_WAITING_CREATES` meter stops reading the client's
messages until the upstream answers one: the rest wait in the client's socket, in
order, and every one is still relayed and metered.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from meter.observe.socket import MAX_WAITING_CREATES

from .socket_server import serving
from .test_websocket import AUTH, create, event, response, socket_meter, ws_url

CREATES = MAX_WAITING_CREATES * 4


class HoldingUpstream:
    """A Responses WebSocket that reads every message at once and answers the creates it
    read, in order, only once `answering` is set: an upstream with a backlog."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.answering = asyncio.Event()
        self.sockets: list[web.WebSocketResponse] = []

    async def hang_up(self) -> None:
        for ws in self.sockets:
            await ws.close(code=1011)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.sockets.append(ws)
        answers = asyncio.create_task(self._answer(ws))
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self.received.append(msg.data.encode())
        finally:
            answers.cancel()
        return ws

    async def _answer(self, ws: web.WebSocketResponse) -> None:
        await self.answering.wait()
        answered = 0
        while True:
            while answered < len(self.received):
                rid = f"resp_{answered:06d}"
                await ws.send_str(event("response.created", response=response(rid)).decode())
                await ws.send_str(event("response.completed", response=response(rid, "completed", {"input_tokens": 10, "output_tokens": 2})).decode())
                answered += 1
            await asyncio.sleep(0.01)


async def settled(values: list[Any], quiet: float = 0.5, timeout: float = 10.0) -> int:
    """The list's length once it has stopped growing for `quiet` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen, since = len(values), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        if len(values) != seen:
            seen, since = len(values), loop.time()
        elif loop.time() - since >= quiet:
            return seen
    raise AssertionError(f"still growing after {timeout}s: {len(values)}")


async def test_creates_the_upstream_has_not_answered_are_bounded_and_all_metered(start_meter) -> None:
    upstream = HoldingUpstream()
    app = web.Application()
    app.router.add_get("/v1/responses", upstream.handle)
    async with serving(app) as port:
        meter = await start_meter(f"http://127.0.0.1:{port}")
        async with ws_connect(ws_url(meter.url), additional_headers=AUTH, max_size=None) as ws:
            for i in range(CREATES):
                await ws.send(create(metadata={"n": str(i)}))
            # Nothing answered: meter relays creates up to its bound, then waits.
            assert await settled(upstream.received) == MAX_WAITING_CREATES
            upstream.answering.set()
            events = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2 * CREATES)]
        # Every create reached the upstream, once and in the client's order.
        assert [json.loads(m)["metadata"]["n"] for m in upstream.received] == [str(i) for i in range(CREATES)]
        assert [e["type"] for e in events] == ["response.created", "response.completed"] * CREATES
        rows = await meter.rows()
    assert len(rows) == CREATES
    assert {(r["outcome"], r["input_tokens"], r["output_tokens"]) for r in rows} == {("completed", 10, 2)}
    assert sorted(r["response_id"] for r in rows) == [f"resp_{i:06d}" for i in range(CREATES)]


async def test_a_client_that_leaves_while_meter_waits_for_the_upstream_is_recorded(start_meter) -> None:
    """Paused, meter does not read the client's close frame: the client gives up on it
    and drops the connection, and what the upstream was asked is recorded as the
    client's hang-up; what it never reached is not a request."""
    upstream = HoldingUpstream()
    app = web.Application()
    app.router.add_get("/v1/responses", upstream.handle)
    async with serving(app) as port:
        meter = await start_meter(f"http://127.0.0.1:{port}")
        loop = asyncio.get_running_loop()
        async with ws_connect(ws_url(meter.url), additional_headers=AUTH, close_timeout=0.5) as ws:
            for _ in range(CREATES):
                await ws.send(create())
            assert await settled(upstream.received) == MAX_WAITING_CREATES
            left = loop.time()
        deadline = loop.time() + 10
        while loop.time() < deadline and len(await meter.rows()) < MAX_WAITING_CREATES:
            await asyncio.sleep(0.1)
        rows = await meter.rows()
        assert loop.time() - left < 5  # the hang-up ended the socket; meter did not wait for the upstream
    assert len(rows) == MAX_WAITING_CREATES
    assert {r["outcome"] for r in rows} == {"client_disconnected"}


async def test_an_upstream_that_hangs_up_while_meter_waits_ends_the_wait(start_meter) -> None:
    """Paused on a full backlog, the client's side is read again when the upstream's
    side ends: the client gets the close, and what the upstream was asked is recorded
    as the upstream's disconnection."""
    upstream = HoldingUpstream()
    app = web.Application()
    app.router.add_get("/v1/responses", upstream.handle)
    async with serving(app) as port:
        meter = await start_meter(f"http://127.0.0.1:{port}")
        async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
            for _ in range(CREATES):
                await ws.send(create())
            assert await settled(upstream.received) == MAX_WAITING_CREATES
            await upstream.hang_up()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline and len(await meter.rows()) < MAX_WAITING_CREATES:
            await asyncio.sleep(0.1)
        rows = await meter.rows()
    assert len(rows) == MAX_WAITING_CREATES
    assert {(r["outcome"], r["error_type"]) for r in rows} == {("error", "upstream_disconnected")}


def test_the_count_of_waiting_creates_follows_every_answer() -> None:
    """created, a lane-less `error` and the socket's end each take a create off the count."""
    m, sink = socket_meter()
    rooms: list[int] = []
    m.on_room = lambda: rooms.append(m.waiting)
    for lane in ("a", "b", None):
        assert m.on_client(create(stream_id=lane).encode() if lane else create().encode()) is None
    assert m.waiting == 3
    m.on_upstream(event("response.created", "a", response=response("resp_a")))
    assert m.waiting == 2
    m.on_upstream(json.dumps({"type": "error", "error": {"type": "invalid_request_error", "code": "x", "message": "no"}}).encode())
    assert m.waiting == 1  # the lane-less create it answered
    m.end("client_disconnected")
    assert m.waiting == 0
    assert rooms == [2, 1, 0]  # told each time, so a paused client is read again
    assert len(sink.records) == 3  # the error's row and the two the end closed
