"""Guard rails: the aiohttp internals meter leans on are still there, and still mean what meter assumes.

meter reads a few private aiohttp attributes where aiohttp offers no public handle.
Most are read with a fallback (a `getattr` default) that keeps meter running but
quietly turns a feature off: the WebSocket relay would stop batching writes, or
never see a slow client.  An aiohttp upgrade must therefore fail here, in CI, not
degrade in production.  Each check drives a real aiohttp server and client and
exercises the attribute the way meter does, through meter's own code where it
can.  `pyproject.toml` pins aiohttp to the minor version these checks passed on.

What meter relies on:
- `StreamResponse._req` (proxy.py `_abort_midway`): the request, to abort its
  transport when the upstream fails midway.
- `RequestHandler._paused` and `BaseProtocol._drain_helper()` (websocket.py
  `_ClientFrames`): whether the client's transport paused writing, and a wait
  until it resumes.
- `ClientWebSocketResponse._reader._buffer` (websocket.py `_parsed_messages`):
  messages parsed and not yet received.
- `web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=)`
  called positionally from `web.Server`'s `request_factory` (server.py).
- `ClientResponse.start(connection)` called by `ws_connect` before it judges the
  handshake or follows a redirect, with the body still readable (websocket.py
  `_HandshakeResponse` raises a refused upgrade whole from there, its body kept
  and no redirect followed).
- `StreamResponse._prepare_headers()`, `_write_headers()`, `_reason` and `_headers`
  (proxy.py `RelayedResponse`): the last step before the head is written, where the
  fields aiohttp adds are taken back and a control character becomes a space.
- `ResponseHandler.closed` (the upstream connection's protocol, proxy.py
  `_connection_end`): a future that fails when the connection ends in a reset.
- `auto_decompress=` of `web.Server`, passed on to each connection's
  `RequestHandler` (server.py): a compressed request body is forwarded as sent.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import tomllib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from packaging.requirements import Requirement

from meter.websocket import _ClientFrames, _HandshakeResponse, _parsed_messages, _Refused

from .conftest import ROOT, SECRET_KEY

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def aiohttp_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [spec] = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "aiohttp"]
    return spec


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Runs a handler on a real aiohttp low-level server; gives its URL."""
    runners: list[web.ServerRunner] = []

    async def start(handler: Handler) -> str:
        runner = web.ServerRunner(web.Server(handler), handle_signals=False)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def test_installed_aiohttp_is_the_pinned_minor() -> None:
    spec = aiohttp_requirement()
    installed = version("aiohttp")
    assert aiohttp.__version__ == installed
    assert spec.specifier.contains(installed), f"aiohttp {installed} is outside the pin {spec}: run tests/test_guard_rails.py before moving the pin"
    # The pin has an upper bound below the next minor, so an upgrade is a decision.
    assert any(s.operator == "<" for s in spec.specifier), f"aiohttp pin {spec} has no upper bound"


async def test_stream_response_req_gives_the_transport_to_abort(serve) -> None:
    """proxy.py aborts the client's connection through `StreamResponse._req.transport`."""
    seen: dict[str, Any] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        req = getattr(resp, "_req", None)
        seen["req_is_request"] = req is request
        seen["transport"] = req.transport if req is not None else None
        resp.force_close()
        assert request.transport is not None
        request.transport.abort()
        return resp

    url = await serve(handler)
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert seen["req_is_request"] is True
    assert isinstance(seen["transport"], asyncio.Transport)


async def test_client_frames_see_a_slow_client_and_wait_for_it(serve) -> None:
    """`_ClientFrames.congested` reads `RequestHandler._paused`; `drain` awaits `_drain_helper()`.

    A client that reads nothing must make the server's transport pause writing
    (congested turns True), and drain must wait until the client reads again.
    """
    state: dict[str, Any] = {"written": 0}
    client_reads = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frames = _ClientFrames(request)
        state["congested_at_start"] = frames.congested
        chunk = b"y" * 65536
        # Kernel buffers on loopback hold a few MiB; 64 MiB unread means congestion was never seen.
        while not frames.congested and state["written"] < 64 << 20:
            frames.add(chunk, 0x2)
            frames.flush()
            state["written"] += len(chunk)
            await asyncio.sleep(0)
        state["congested"] = frames.congested
        try:
            drain = asyncio.ensure_future(frames.drain())
            await asyncio.sleep(0.3)
            state["drain_waited"] = not drain.done()
        finally:  # whatever broke, let the client read on, so the test fails fast
            client_reads.set()
        await asyncio.wait_for(drain, 10)
        state["congested_after_drain"] = frames.congested
        await ws.close()
        return ws

    url = await serve(handler)
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        await asyncio.wait_for(client_reads.wait(), 30)
        received = 0
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.BINARY
            received += len(msg.data)
    assert state["congested_at_start"] is False
    assert state["congested"] is True, f"wrote {state['written']} bytes to a client that reads nothing and never saw the transport pause"
    assert state.get("drain_waited") is True, "drain() did not wait for a client that reads nothing"
    assert state.get("congested_after_drain") is False
    assert received == state["written"]


async def test_parsed_messages_is_the_client_websocket_queue(serve) -> None:
    """`_parsed_messages` must find aiohttp's queue, not its `()` fallback: it fills as
    messages are parsed and empties as they are received."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frames = _ClientFrames(request)
        for i in range(5):
            frames.add(b"message %d" % i, 0x1)
        frames.flush()  # one write: the client parses all five from one read
        await ws.receive()  # until the client closes
        return ws

    url = await serve(handler)
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        queue = _parsed_messages(ws)
        assert isinstance(queue, deque), f"aiohttp's parsed-message queue moved: got {queue!r}"
        for _ in range(200):
            if len(queue) == 5:
                break
            await asyncio.sleep(0.01)
        assert len(_parsed_messages(ws)) == 5
        texts = [(await ws.receive()).data for _ in range(5)]
        assert texts == [f"message {i}" for i in range(5)]
        assert len(_parsed_messages(ws)) == 0


def test_base_request_takes_what_meters_request_factory_passes() -> None:
    """server.py builds each proxy request as `web.BaseRequest(message, payload, protocol,
    writer, task, loop, client_max_size=...)`; aiohttp's request_factory passes the first five."""
    params = list(inspect.signature(web.BaseRequest.__init__).parameters)
    assert params[1:7] == ["message", "payload", "protocol", "payload_writer", "task", "loop"]
    assert "client_max_size" in params


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["with-the-headers", "trickling"])
async def test_request_factory_limits_a_chunked_body(upstream, start_meter, pause: float) -> None:
    """The request factory really builds meter's requests, and a body without
    Content-Length past --max-request-bytes is refused with 413, whether it is all
    there when the handler starts or still arriving; a small one is forwarded."""
    meter = await start_meter(upstream.url, max_request_bytes=4096)

    async def chunks(size: int) -> AsyncIterator[bytes]:
        body = b'{"model": "gpt-4o-mini", "input": "' + b"a" * size + b'"}'
        for i in range(0, len(body), 1024):
            if pause:
                await asyncio.sleep(pause)
            yield body[i : i + 1024]

    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(meter.url + "/v1/responses", data=chunks(100), headers=headers) as r:
            assert r.status == 200, await r.text()
        async with s.post(meter.url + "/v1/responses", data=chunks(64 * 1024), headers=headers) as r:
            assert r.status == 413, f"a chunked body of 64 KiB passed a 4 KiB --max-request-bytes ({r.status})"
            assert (await r.json())["error"]["code"] == "request_too_large"


async def test_handshake_response_keeps_a_refused_upgrade_body(serve) -> None:
    """`ws_connect` drops a refused upgrade's body, and follows a redirect: meter's
    response class must see the answer first, and raise it whole (`_Refused`)."""
    refusal = b'{"error": {"message": "no", "type": "invalid_request_error", "code": "refused"}}'

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=403, body=refusal, content_type="application/json", headers={"x-request-id": "req_1"})

    url = await serve(handler)
    async with aiohttp.ClientSession(response_class=_HandshakeResponse) as s:
        with pytest.raises(_Refused) as refused:
            await s.ws_connect(url)
    assert refused.value.status == 403, "ws_connect no longer calls ClientResponse.start: the refusal's body is lost"
    assert refused.value.body == refusal and refused.value.headers["x-request-id"] == "req_1"


def test_the_response_and_connection_internals_the_relay_uses() -> None:
    """What `RelayedResponse`, `_connection_end` and the proxy's server settings call:
    a renamed one would fail a request (or every connection) only at run time."""
    from aiohttp import client_proto, web_protocol

    assert inspect.iscoroutinefunction(web.StreamResponse._prepare_headers)
    assert inspect.iscoroutinefunction(web.StreamResponse._write_headers)
    response = web.StreamResponse(status=403, reason="Nope")
    assert response._reason == "Nope" and response._headers is response.headers
    assert isinstance(client_proto.ResponseHandler.closed, property)
    assert "auto_decompress" in inspect.signature(web_protocol.RequestHandler.__init__).parameters
