"""Forwarding under hostile request targets, slow clients and tricky headers (SPEC §2, §2b).

Every test talks to a real meter (`meter serve` as a process, or `Meter` in the
test's loop when it needs to reach the proxy) over raw sockets, because the
interesting inputs are the ones an HTTP client library would never send.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest

from meter.paths import normalised_path, origin_form, target_for_record

from .conftest import SECRET_KEY, clear_upstream_requests, ledger_rows, upstream_requests
from .socket_server import SocketServer, exchange

# --- raw HTTP helpers ---------------------------------------------------------


def request(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: meter.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


def assert_meter_error(answer: bytes, status: int, code: str) -> None:
    assert status_of(answer) == status, answer[:200]
    error = json.loads(body_of(answer))["error"]
    assert error["type"] == "meter_proxy_error" and error["code"] == code and error["param"] is None


class Listener(SocketServer):
    """A socket that stands for "some other host": it must never be connected to, and
    keeps the head of any request that reaches it all the same (`received`)."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0
        self.received = bytearray()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            self.received += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nnot-you")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def meter_port(meter: Any) -> int:
    return meter.meter.proxy_address[1]


# --- pure functions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/responses?x=1", "/v1/responses?x=1"),
        ("//evil/x", "//evil/x"),  # origin form: the upstream's host still comes first
        ("http://other/v1/x?y=1", "/v1/x?y=1"),
        ("HTTPS://u:p@other:99/v1/x", "/v1/x"),
        ("http://other", "/"),
        ("http://other?q=1", "/?q=1"),
        ("http://[::1]:8/x", "/x"),
        ("http:///x", None),
        ("ftp://other/x", None),
        ("other:443", None),
        ("@10.1.2.3:6379", None),
        ("*", None),
        ("", None),
    ],
)
def test_origin_form(target: str, expected: str | None) -> None:
    assert origin_form(target) == expected


def test_target_for_record_drops_userinfo_and_query() -> None:
    assert target_for_record("user:pw@10.1.2.3:6379?k=sk-1") == "10.1.2.3:6379"
    assert target_for_record("*") == "*"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/responses", "/v1/responses"),
        ("/v1/file.json", "/v1/file.json"),
        ("/v1/respons%65s", "/v1/responses"),
        ("/v1/RESPONS%65S", "/v1/RESPONSeS"),
        ("/v1/%72esponses/%2e%2E/x", "/v1/x"),
        ("/v1/x/../responses", "/v1/responses"),
        ("/v1/./responses", "/v1/responses"),
        ("/a/b/c/./../../g", "/a/g"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/../../v1/responses", "/v1/responses"),
        ("/v1/a%2fb", "/v1/a%2Fb"),  # reserved: stays encoded
        ("/v1/.well-known", "/v1/.well-known"),
        ("/v1/x%", "/v1/x%"),
    ],
)
def test_normalised_path(path: str, expected: str) -> None:
    assert normalised_path(path) == expected


# --- 1. only the configured upstream is contacted ----------------------------


async def test_targets_never_reach_another_host(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    port = meter_port(meter)
    await clear_upstream_requests(upstream.url)
    async with Listener() as other:
        elsewhere = f"127.0.0.1:{other.port}"
        refused = [
            ("CONNECT", elsewhere, 405, "method_not_allowed"),
            ("CONNECT", "@" + elsewhere, 405, "method_not_allowed"),
            ("CONNECT", "/v1/responses", 405, "method_not_allowed"),
            ("OPTIONS", "*", 400, "invalid_request_target"),
            ("GET", f"ftp://{elsewhere}/v1/models", 400, "invalid_request_target"),
        ]
        for method, target, status, code in refused:
            assert_meter_error(await exchange(port, request(method, target)), status, code)
        answer = await exchange(port, request("GET", f"http://{elsewhere}/v1/models?probe=abs"))
        assert status_of(answer) == 200 and b"not-you" not in answer
        answer = await exchange(port, request("GET", f"HTTP://user:pw@{elsewhere}?probe=bare"))
        assert b"not-you" not in answer
        answer = await exchange(port, request("GET", f"//{elsewhere}/v1/models?probe=double-slash"))
        assert b"not-you" not in answer
        assert other.connections == 0
    seen = [r["path_qs"] for r in await upstream_requests(upstream.url)]
    assert seen == ["/v1/models?probe=abs", "/?probe=bare", f"//{elsewhere}/v1/models?probe=double-slash"]
    rows = await meter.rows()
    assert [(r["method"], r["status_code"], r["outcome"], r["error_code"]) for r in rows[:5]] == [
        (m, s, "error", c) for m, _, s, c in refused
    ]
    assert rows[1]["path"] == elsewhere  # no userinfo-like prefix kept
    assert [r["path"] for r in rows[5:]] == ["/v1/models", "/", f"//{elsewhere}/v1/models"]


async def test_absolute_form_keeps_the_upstream_prefix(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url + "/prefix")
    await clear_upstream_requests(upstream.url)
    async with Listener() as other:
        body = b'{"model":"gpt-4o","input":"hi"}'
        await exchange(meter_port(meter), request("POST", f"http://127.0.0.1:{other.port}/v1/responses?a=%41", {"Content-Type": "application/json"}, body))
        assert other.connections == 0
    [seen] = await upstream_requests(upstream.url)
    assert seen["path_qs"] == "/prefix/v1/responses?a=%41"
    assert base64.b64decode(seen["body_b64"]) == body
    [row] = await meter.rows()
    assert row["path"] == "/v1/responses" and row["endpoint"] == "responses"


async def fake_websocket_paths(upstream_url: str) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(upstream_url + "/__fake/ws") as r:
        return [entry["path_qs"] for entry in await r.json()]


async def test_websocket_in_absolute_form_goes_to_the_upstream(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    before = len(await fake_websocket_paths(upstream.url))
    async with Listener() as other:
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (
            f"GET http://127.0.0.1:{other.port}/v1/responses?ws=abs HTTP/1.1\r\nHost: meter.test\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", meter_port(meter))
        try:
            writer.write(handshake)
            status_line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        assert other.connections == 0
    assert status_line.startswith(b"HTTP/1.1 101"), status_line
    assert (await fake_websocket_paths(upstream.url))[before:] == ["/v1/responses?ws=abs"]


class BadHeaderAddon:
    """An addon that breaks the upstream request the way a bug would: aiohttp's client
    refuses a header value with a line feed (ValueError, not a ClientError)."""

    def request(self, flow: Any) -> None:
        flow.upstream_headers["X-Broken"] = "a\nb"


async def test_any_failure_to_send_upstream_is_502(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, extra_addons=[BadHeaderAddon()])
    answer = await exchange(meter_port(meter), request("GET", "/v1/models"))
    assert_meter_error(answer, 502, "upstream_unreachable")
    [row] = await meter.rows()
    assert row["status_code"] == 502 and row["outcome"] == "upstream_unreachable"


class FullBacklog:
    """A listener that never accepts and whose backlog is full: a connection to it is
    never set up (the kernel drops its SYN), so connecting times out."""

    async def __aenter__(self) -> Self:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # the backlog holds one or two; the rest are left pending
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)
        await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in (*self.fillers, self.listener):
            s.close()


async def test_a_connect_timeout_is_502_unreachable_not_504(start_meter) -> None:
    # SPEC §2: an upstream meter cannot connect to is unreachable (502); 504 is an
    # upstream that connected and then did not answer in time.
    async with FullBacklog() as full:
        meter = await start_meter(f"http://127.0.0.1:{full.port}", connect_timeout=1, upstream_timeout=30)
        started = time.monotonic()
        answer = await exchange(meter_port(meter), request("GET", "/v1/models"), timeout=20)
        assert time.monotonic() - started < 10  # the connect timeout, not the upstream one
        assert_meter_error(answer, 502, "upstream_unreachable")
        # The WebSocket handshake connects the same way, and fails the same way.
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = request("GET", "/v1/responses", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"})
        reader, writer = await asyncio.open_connection("127.0.0.1", meter_port(meter))
        try:
            writer.write(handshake.replace(b"Connection: close\r\n", b""))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            answer = head + await asyncio.wait_for(reader.readexactly(length), 5)
        finally:
            writer.close()
        assert_meter_error(answer, 502, "upstream_unreachable")
        rows = await meter.rows()
    assert [(r["status_code"], r["outcome"], r["error_type"], r["error_code"]) for r in rows] == [
        (502, "upstream_unreachable", "meter_proxy_error", "upstream_unreachable"),
    ] * 2


# --- 2. classification on the normalised path ---------------------------------


async def test_classified_on_normalised_path_forwarded_as_sent(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await clear_upstream_requests(upstream.url)
    body = b'{"model":"gpt-4o","input":"hi"}'
    targets = ["/v1/respons%65s", "/v1/x/../responses", "/v1/%2e/responses"]
    for target in targets:
        await exchange(meter_port(meter), request("POST", target, {"Content-Type": "application/json"}, body))
    assert [r["path_qs"] for r in await upstream_requests(upstream.url)] == targets
    rows = await meter.rows()
    assert [(r["path"], r["endpoint"]) for r in rows] == [(t, "responses") for t in targets]


# --- 3. a client that stalls while sending its body ---------------------------


def serve_log(meter: Any) -> str:
    assert meter.log_path is not None
    return Path(meter.log_path).read_text(errors="replace")


async def test_stalled_body_is_408_and_closed(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "stall.duckdb"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--client-timeout", "1")
    head = request("POST", "/v1/responses", {"Content-Type": "application/json", "Content-Length": "100"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    try:
        writer.write(head + b'{"model": "gpt-4o", "input": "')  # then silence
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)  # read() ends only when meter closes
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert_meter_error(answer, 408, "client_timeout")
    assert 0.9 < waited < 5
    proc.stop()
    [row] = ledger_rows(ledger)
    assert row["status_code"] == 408 and row["outcome"] == "error" and row["error_code"] == "client_timeout"


async def test_a_stalled_request_head_is_closed_after_the_client_timeout(upstream, meter_process, tmp_path: Path) -> None:
    # Half a request line, then silence: it holds a socket and a buffer until meter
    # lets go, which should be --client-timeout, not aiohttp's 75 s keep-alive.
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), "--client-timeout", "1")
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    try:
        writer.write(b"POST /v1/respo")
        await writer.drain()
        started = time.monotonic()
        await asyncio.wait_for(reader.read(), 10)  # ends when meter closes the connection
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert waited < 5, f"a stalled request head was held {waited:.1f} s"


# --- 4. one budget for request bodies being buffered --------------------------


async def slow_upload(port: int, declared: int, sent: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("POST", "/v1/responses", {"Content-Type": "application/json", "Content-Length": str(declared)}) + sent)
    await writer.drain()
    return reader, writer


async def test_buffered_bodies_share_one_budget(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    proxy = meter.meter.proxy
    # Set in-process, small, so that three uploads fill the budget and time out soon.
    proxy.max_buffered_request_bytes, proxy.client_timeout = 3000, 1.5
    port = meter_port(meter)
    slow = [await slow_upload(port, 1000, b'{"model": "') for _ in range(3)]
    await asyncio.sleep(0.2)  # all three are reading their bodies
    assert proxy.buffered_request_bytes == 3000  # each declared length, reserved up front
    assert_meter_error(await exchange(port, request("POST", "/v1/responses", {}, b"x" * 100)), 503, "meter_overloaded")
    answers = [await asyncio.wait_for(r.read(), 10) for r, _ in slow]
    for _, writer in slow:
        writer.close()
    for answer in answers:
        assert_meter_error(answer, 408, "client_timeout")
    ok = await exchange(port, request("POST", "/v1/responses", {"Content-Type": "application/json"}, b'{"model":"gpt-4o","input":"hi"}'))
    assert status_of(ok) == 200
    assert proxy.buffered_request_bytes == 0
    rows = await meter.rows()
    assert sorted(r["status_code"] for r in rows) == [200, 408, 408, 408, 503]
    assert [r["error_code"] for r in rows if r["status_code"] == 503] == ["meter_overloaded"]


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer with a Content-Length, without waiting for the connection to close
    (with a body still unread, aiohttp lingers before it closes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    return head + await reader.readexactly(length)


async def test_a_large_head_held_while_its_body_arrives_counts_against_the_budget(upstream, start_meter) -> None:
    """A request head is held for as long as its body takes to arrive.  Up to 128
    headers of up to 64 KiB each: ~15 MiB per connection, uncounted, for as long as a
    body trickled in (40 such connections took meter from 62 to 676 MB).  Past 64 KiB a
    head is counted, twice (its bytes and its parsed copy), in the budget the body is."""
    meter = await start_meter(upstream.url)
    proxy = meter.meter.proxy
    proxy.max_buffered_request_bytes, proxy.client_timeout = 1 << 20, 30
    port = meter_port(meter)
    big = {f"X-Filler-{i}": "f" * 60_000 for i in range(10)}  # 600 kB: 1.2 MB counted, past the 1 MiB budget
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("POST", "/v1/responses", {"Content-Type": "application/json", "Content-Length": "100", **big}) + b'{"model": "')
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)  # at once, not when the body stalls
    finally:
        writer.close()
    assert_meter_error(answer, 503, "meter_overloaded")
    fits = {f"X-Filler-{i}": "f" * 60_000 for i in range(5)}  # 300 kB: 600 kB counted, and the body's 100
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("POST", "/v1/responses", {"Content-Type": "application/json", "Content-Length": "100", **fits}) + b'{"model": "')
        await writer.drain()
        await asyncio.sleep(0.3)
        assert 600_000 < proxy.buffered_request_bytes < 700_000, proxy.buffered_request_bytes
    finally:
        writer.close()
    await asyncio.sleep(0.3)
    assert proxy.buffered_request_bytes == 0  # given back when the client left


async def test_chunked_body_reserves_as_it_grows(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    proxy = meter.meter.proxy
    proxy.max_buffered_request_bytes = 3000
    head = b"POST /v1/responses HTTP/1.1\r\nHost: meter.test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", meter_port(meter))
    try:
        writer.write(head)
        for _ in range(4):
            writer.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")  # the end, so that meter need not linger for it
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert_meter_error(answer, 503, "meter_overloaded")
    assert proxy.buffered_request_bytes == 0
    [row] = await meter.rows()
    assert row["status_code"] == 503 and row["outcome"] == "error"


# --- 5. Expect: 100-continue ----------------------------------------------------


class StrictUpstream(SocketServer):
    """A raw-socket upstream that honours `Expect: 100-continue` the strict way: it
    waits for the body without ever sending `100 Continue` (what a client that
    forwarded the header would wait for), then answers 200 with a JSON body."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if re.search(rb"(?i)\r\nexpect:\s*100-continue", head):
                    continue_ = await reader.read(1)  # the strict server: nothing until the body
                    if not continue_:
                        return
                    rest = continue_
                else:
                    rest = b""
                length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                body = rest + await reader.readexactly(length - len(rest))
                self.bodies.append(body)
                answer = b'{"object":"list","data":[]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_expect_100_continue_answered_by_meter(start_meter) -> None:
    async with StrictUpstream() as strict:
        meter = await start_meter(strict.url, upstream_timeout=30)
        body = b'{"model":"gpt-4o","input":"hi"}'
        head = request("POST", "/v1/responses", {"Content-Type": "application/json", "Content-Length": str(len(body)), "Expect": "100-continue"})
        reader, writer = await asyncio.open_connection("127.0.0.1", meter_port(meter))
        try:
            writer.write(head)
            await writer.drain()
            try:
                interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            except TimeoutError:
                interim = b""  # like curl, send the body anyway after a while
            writer.write(body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        assert status_of(answer) == 200
        assert strict.bodies == [body]
        assert b"expect" not in strict.heads[0].lower()


# --- 6. headers the Connection header names are not identity -----------------


async def test_connection_named_headers_do_not_attribute_the_row(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await clear_upstream_requests(upstream.url)
    port = meter_port(meter)
    identity = {"Authorization": f"Bearer {SECRET_KEY}", "OpenAI-Project": "proj_spoofed", "x-api-key": "sk-other-key-9999"}
    await exchange(port, request("GET", "/v1/models", identity))
    await exchange(port, request("GET", "/v1/models", {**identity, "Connection": "close, Authorization, OpenAI-Project"}))
    await exchange(port, request("GET", "/v1/models", {**identity, "Connection": "close, Authorization, x-api-key"}))
    received = [{name.lower() for name, _ in r["headers"]} for r in await upstream_requests(upstream.url)]
    assert "authorization" in received[0] and "authorization" not in received[1] and "openai-project" not in received[1]
    rows = await meter.rows()
    assert (rows[0]["key_id"], rows[0]["project"]) == (hashlib.sha256(SECRET_KEY.encode()).hexdigest()[:16], "proj_spoofed")
    # What the upstream received: the x-api-key, no project.
    assert (rows[1]["key_hint"], rows[1]["project"]) == ("sk-...9999", None)
    assert (rows[2]["key_id"], rows[2]["project"]) == (None, "proj_spoofed")


def masked_text_frame(payload: bytes) -> bytes:
    """One client WebSocket text frame (RFC 6455 §5.2: client frames are masked)."""
    mask = os.urandom(4)
    size = len(payload)
    header = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_connection_named_headers_do_not_attribute_websocket_rows(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        "GET /v1/responses HTTP/1.1\r\nHost: meter.test\r\nUpgrade: websocket\r\nConnection: Upgrade, Authorization, OpenAI-Project\r\n"
        f"Authorization: Bearer {SECRET_KEY}\r\nOpenAI-Project: proj_spoofed\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", meter_port(meter))
    try:
        writer.write(handshake)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101")
        writer.write(masked_text_frame(b'{"type":"response.create","model":"gpt-4o","input":"hi"}'))
        seen = b""
        while b"response.completed" not in seen:
            seen += await asyncio.wait_for(reader.read(65536), 10)
        writer.write(b"\x88\x80" + os.urandom(4))  # close, no payload
        await writer.drain()
    finally:
        writer.close()
    [row] = await meter.rows("transport = 'websocket'")
    assert row["input_tokens"] is not None  # the response was metered ...
    assert (row["key_id"], row["project"]) == (None, None)  # ... and attributed to what the upstream got


# --- 7. malformed requests: one warning line, no traceback ---------------------


async def test_malformed_requests_log_one_warning_line(upstream, meter_process, tmp_path: Path) -> None:
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "m.duckdb"))
    malformed = [
        b"GET garbage HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET_KEY.encode() + b"\x7f\r\n\r\n",
        b"GET *" + SECRET_KEY.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # aiohttp's message is the target itself
        b"GET garbage-" + SECRET_KEY.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for data in malformed:
        answer = await exchange(proc.port, data)
        assert status_of(answer) == 400
    await asyncio.sleep(0.3)
    proc.stop()
    text = serve_log(proc)
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    warnings = [line for line in text.splitlines() if " WARNING " in line and "malformed request" in line]
    assert len(warnings) == len(malformed), text[-3000:]
    assert SECRET_KEY not in text and SECRET_KEY[:-4] not in text


class GarbageUpstream(SocketServer):
    """An upstream that answers every request with bytes that are not HTTP."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        writer.close()


async def test_malformed_upstream_answer_is_502_and_one_warning_line(meter_process, tmp_path: Path) -> None:
    async with GarbageUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}") as garbage:
        proc = meter_process("--upstream", garbage.url, "--ledger", str(tmp_path / "g.duckdb"))
        answer = await exchange(proc.port, request("GET", "/v1/models?key=sk-in-a-query"))
        assert_meter_error(answer, 502, "upstream_unreachable")
        proc.stop()
    text = serve_log(proc)
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    [line] = [line for line in text.splitlines() if " WARNING " in line]
    assert "upstream request failed for GET /v1/models" in line and "sk-in-a-query" not in text
