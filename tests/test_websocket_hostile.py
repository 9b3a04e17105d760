"""A hostile WebSocket client cannot make meter miss a response's usage (SPEC §2b),
and a hostile upstream cannot send the client's handshake elsewhere.

Only events that can be attributed end a response: an upstream `error` that
names no `stream_id` (the answer to a bogus client message) must not end the
response that is running, whose real terminal event carries the usage.

The handshake tests speak raw HTTP on both sides (an upstream that answers the
upgrade with bytes of its choosing, a client that reads meter's answer byte for
byte), since a WebSocket library would follow, or hide, what is being tested.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time

import pytest
from websockets.asyncio.client import connect as ws_connect

from .conftest import SECRET_KEY, ledger_rows
from .socket_server import SocketServer
from .test_hostile_forwarding import Listener
from .test_websocket import AUTH, clear_ws_log, create, until_terminal, ws_log, ws_url

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


# --- hostile handshakes ------------------------------------------------------------


class RawUpstream(SocketServer):
    """A server that reads each request's head, keeps it, waits `delay` seconds (noting
    in `hung_up` a client that leaves meanwhile), then writes `answer` (bytes of its
    choosing) and closes."""

    def __init__(self, answer: bytes = b"", delay: float = 0.0) -> None:
        super().__init__()
        self.answer, self.delay = answer, delay
        self.heads: list[bytes] = []
        self.hung_up = asyncio.Event()  # a connection ended before its answer was written

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if self.delay:
                try:
                    await asyncio.wait_for(reader.read(1), self.delay)  # b"" once meter hangs up
                    self.hung_up.set()
                    return
                except TimeoutError:
                    pass
            writer.write(self.answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def upgrade(headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /v1/responses HTTP/1.1", "Host: meter.test", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer_to(meter_url: str, headers: dict[str, str]) -> tuple[bytes, dict[str, str], bytes]:
    """meter's answer to a WebSocket upgrade: status line, headers (lower-cased names), body."""
    host, port = meter_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(upgrade(headers))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status, *lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
        fields = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        body = await asyncio.wait_for(reader.readexactly(int(fields.get("content-length", "0"))), 10)
        return status.encode("latin-1"), fields, body
    finally:
        writer.close()


async def test_a_redirected_upgrade_is_relayed_never_followed(start_meter) -> None:
    # The upstream answers the upgrade with a 302 to another host: meter must not go
    # there (the client's key and project would go with it), and the client gets the
    # upstream's own answer, as for any other refused upgrade.
    async with Listener() as other:
        location = f"http://localhost:{other.port}/landed"
        body = b'{"moved":"elsewhere"}'
        answer = b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (location.encode(), len(body), body)
        async with RawUpstream(answer) as hostile:
            meter = await start_meter(hostile.url)
            status, fields, got = await answer_to(meter.url, {"api-key": SECRET_KEY, "OpenAI-Project": "proj_secret"})
            await asyncio.sleep(0.2)  # a redirect meter followed would have reached the other host by now
    assert other.connections == 0 and bytes(other.received) == b"", bytes(other.received)
    assert len(hostile.heads) == 1
    assert (status, fields["location"], fields["content-type"], got) == (b"HTTP/1.1 302 Found", location, "application/json", body)
    [row] = await meter.rows()
    assert (row["transport"], row["status_code"], row["outcome"]) == ("http", 302, "error")
    assert row["response_bytes"] == len(body)


async def test_a_client_that_gives_up_during_the_handshake_is_recorded(start_meter) -> None:
    # The upstream takes 3 s to answer the upgrade; the client hangs up after 1 s.  As
    # over HTTP, that request is one row: client_disconnected.
    async with RawUpstream(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", delay=3) as slow:
        meter = await start_meter(slow.url)
        host, port = meter.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(upgrade(AUTH))
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()
        hung_up = time.monotonic()
        await asyncio.wait_for(slow.hung_up.wait(), 1.5)  # meter gave up the upstream handshake too
        assert time.monotonic() - hung_up < 1.5
        rows = await meter.rows()
    assert len(rows) == 1, f"expected the handshake's row, got {rows}"
    [row] = rows
    assert (row["outcome"], row["transport"], row["status_code"], row["endpoint"]) == ("client_disconnected", "http", None, "responses")
    assert row["duration_ms"] >= 900


async def test_a_handshake_cut_by_shutdown_is_recorded_as_such(start_meter) -> None:
    # The same pending handshake, ended by meter's grace period instead of the client.
    async with RawUpstream(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", delay=3) as slow:
        meter = await start_meter(slow.url, shutdown_grace=0.3)
        host, port = meter.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(upgrade(AUTH))
        await writer.drain()
        await asyncio.sleep(0.3)
        await meter.stop()
        writer.close()
    [row] = ledger_rows(meter.ledger_path)
    assert (row["outcome"], row["error_type"], row["error_code"], row["status_code"]) == ("error", "meter_proxy_error", "shutting_down", None)


async def test_a_101_that_is_no_valid_upgrade_is_502(start_meter) -> None:
    # Only a non-101 answer is relayed as the upstream's; a 101 meter cannot use is meter's 502.
    async with RawUpstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n") as broken:
        meter = await start_meter(broken.url)
        status, _, body = await answer_to(meter.url, AUTH)
    assert status == b"HTTP/1.1 502 Bad Gateway" and json.loads(body)["error"]["code"] == "invalid_upstream_handshake"
    [row] = await meter.rows()
    assert (row["transport"], row["status_code"], row["outcome"]) == ("http", 502, "error")


# --- budgets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        r'{"type":"response.\u0063reate","model":"gpt-4o","input":"two"}',  # an escape the upstream decodes
        '{"type":"response.steer","type":"response.create","model":"gpt-4o","input":"two"}',  # the last of two keys counts
    ],
)
async def test_a_response_create_in_another_spelling_is_still_refused_by_a_budget(upstream, start_meter, tmp_path, spelling: str) -> None:
    # The upstream reads these as a `response.create`: meter must too, or an enforcing
    # budget is dodged and the response runs (and is billed) past its limit.
    config = tmp_path / "meter.toml"
    config.write_text('[[budgets]]\nname = "ws"\nwindow = "day"\nlimit_usd = 0.001\nmode = "enforce"\n')
    meter = await start_meter(upstream.url, config=str(config))
    await clear_ws_log(upstream.url)
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        await ws.send(create(metadata={"fake_usage": {"input_tokens": 1000, "output_tokens": 500}}))
        assert (await until_terminal(ws))[-1]["type"] == "response.completed"
        assert meter.meter.budgets.blocked
        await ws.send(spelling)
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (answer["type"], answer.get("status"), answer.get("error", {}).get("code")) == ("error", 429, "budget_exceeded"), answer
    [socket] = await ws_log(upstream.url)
    assert socket["messages"] == 1  # the refused one never reached the upstream
    rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["completed", "rejected"]
    assert rows[1]["model_requested"] == "gpt-4o"


# --- memory ------------------------------------------------------------------------


async def test_a_large_response_create_is_not_held_while_its_response_runs(upstream, meter_process, tmp_path) -> None:
    # A Codex turn carries its whole input; over HTTP a body held until its record is
    # made counts against --max-buffered-request-bytes, and a socket's responses must
    # not hold theirs uncounted for as long as each runs (minutes, for an agent turn).
    from .test_websocket import rss_bytes

    meter = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"))
    assert meter.proc is not None
    sockets, size = 4, 40 << 20
    headers = {**AUTH, "x-fake-deltas": "100", "x-fake-chunk-delay-ms": "50"}  # each response runs ~5 s
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(ws_connect(ws_url(meter.url), additional_headers=headers, max_size=None)) for _ in range(sockets)]
        # Warm-up: meter's own first-response costs are not the question (two deltas, not the ~5 s response).
        await conns[0].send(create(metadata={"fake_deltas": "2"}))
        await until_terminal(conns[0])
        before = rss_bytes(meter.proc.pid)
        for ws in conns:
            await ws.send(create(input="x" * size))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "response.created"
        await asyncio.sleep(0.5)
        grown = rss_bytes(meter.proc.pid) - before
        for ws in conns:
            assert (await until_terminal(ws))[-1]["type"] == "response.completed"
    assert grown < size, f"meter holds {grown >> 20} MiB while {sockets} responses of {size >> 20} MiB requests run"
    meter.stop()
    rows = [r for r in ledger_rows(tmp_path / "l.duckdb") if r["request_bytes"] > size]
    assert len(rows) == sockets and all(r["outcome"] == "completed" for r in rows)


async def test_an_idle_socket_holds_no_message_it_relayed(upstream, meter_process, tmp_path) -> None:
    # The fake echoes a binary message: 40 MiB each way, then the sockets idle.  What was
    # relayed is gone; an idle socket waits for its next message holding nothing.
    from .test_websocket import rss_bytes

    meter = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"))
    assert meter.proc is not None
    sockets, size = 4, 40 << 20
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(ws_connect(ws_url(meter.url), additional_headers=AUTH, max_size=None)) for _ in range(sockets)]
        await conns[0].send(b"warm-up")
        assert await asyncio.wait_for(conns[0].recv(), 5) == b"warm-up"
        before = rss_bytes(meter.proc.pid)
        for i, ws in enumerate(conns):
            message = bytes([i]) * size
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 30) == message
        del message
        await asyncio.sleep(0.5)
        grown = rss_bytes(meter.proc.pid) - before
    assert grown < size, f"meter holds {grown >> 20} MiB for {sockets} idle sockets"
