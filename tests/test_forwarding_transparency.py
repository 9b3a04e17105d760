"""What crosses meter, byte for byte, on both sides of an HTTP exchange (SPEC §2).

A raw-socket upstream keeps every request exactly as it arrived and answers each
with bytes the test wrote, so both sides are compared as bytes: the request line,
header fields in their order and repeats, bodies; the status line, the answer's
headers, its body still encoded.  Clients are raw sockets too, for what an HTTP
library would tidy up (an HTTP/1.0 request, pipelining, a reset connection).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import struct
from typing import Any

import brotli
import pytest
import zstandard

from .socket_server import SocketServer, exchange

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class RecordingUpstream(SocketServer):
    """Keeps each request as it arrived (`requests`: head and body bytes, in arrival
    order) and answers it with the next of `answers` (the last one once they run out);
    an answer given as a list is sent piece by piece, and then the connection closes."""

    def __init__(self, *answers: bytes | list[bytes]) -> None:
        super().__init__()
        self.answers = list(answers) or [OK]
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.requests.append(head + body)
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                for piece in answer if isinstance(answer, list) else [answer]:
                    writer.write(piece)
                    await writer.drain()
                if isinstance(answer, list):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def host(self) -> bytes:
        return b"127.0.0.1:%d" % self.port


def port_of(meter: Any) -> int:
    return meter.meter.proxy_address[1]


def head_fields(answer: bytes) -> list[tuple[bytes, bytes]]:
    head = answer.split(b"\r\n\r\n", 1)[0]
    return [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]  # type: ignore[misc]


# --- request side ----------------------------------------------------------------


async def test_requests_reach_the_upstream_as_sent(start_meter) -> None:
    """Target, fields and body as the client wrote them; only the hop-by-hop fields
    (and those `Connection` names) go, `Host` becomes the upstream's, and a chunked
    upload arrives as the same bytes with a length."""
    async with RecordingUpstream() as upstream:
        meter = await start_meter(upstream.url)
        port = port_of(meter)
        target = b"/v1/a%2Fb/../c/%E2%82%AC/?x=1&x=2&y=&z&q=%20+%2B"
        await exchange(
            port,
            b"GET " + target + b" HTTP/1.1\r\nHost: meter.test\r\nX-A: 1\r\nX-B: two  words\r\nX-A: 3\r\n"
            b"Connection: close, X-Drop\r\nX-Drop: d\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Empty:\r\n\r\n",
        )
        body = bytes(range(256)) + b"\r\n\r\n"
        await exchange(port, b"POST /v1/files HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await exchange(port, b"POST /v1/files HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;ext=1\r\n\x00\xff\r\n0\r\n\r\n")
        await exchange(port, b"GET http://elsewhere.test/v1/models?a=%2F HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n")
        await exchange(port, b"GET /v1/models HTTP/1.0\r\n\r\n")
        host = b"Host: " + upstream.host() + b"\r\n"
        assert upstream.requests == [
            b"GET " + target + b" HTTP/1.1\r\n" + host + b"X-A: 1\r\nX-B: two  words\r\nX-A: 3\r\nX-Empty: \r\n\r\n",
            b"POST /v1/files HTTP/1.1\r\n" + host + b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            b"POST /v1/files HTTP/1.1\r\n" + host + b"Content-Length: 5\r\n\r\nabc\x00\xff",
            b"GET /v1/models?a=%2F HTTP/1.1\r\n" + host + b"\r\n",
            b"GET /v1/models HTTP/1.1\r\n" + host + b"\r\n",
        ]


async def test_pipelined_requests_are_answered_in_order(start_meter) -> None:
    async with RecordingUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none", b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\ntwo", b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nthree"
    ) as upstream:
        meter = await start_meter(upstream.url)
        answer = await exchange(
            port_of(meter),
            b"GET /v1/one HTTP/1.1\r\nHost: h\r\n\r\nPOST /v1/two HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /v1/three HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        assert [line.split(b" ", 1)[0] for line in upstream.requests] == [b"GET", b"POST", b"GET"]
        assert upstream.requests[1].endswith(b"\r\n\r\nabc")
        assert re.findall(rb"HTTP/1.1 (\d+ \w+)\r\n", answer) == [b"200 OK", b"201 Created", b"202 Accepted"]
        assert answer.endswith(b"\r\n\r\nthree") and b"\r\n\r\none" in answer and b"\r\n\r\ntwo" in answer


# --- answer side -----------------------------------------------------------------


async def test_the_answer_head_is_the_upstreams(start_meter) -> None:
    """Status, reason and every end-to-end field in order (repeated `Set-Cookie` too),
    and no field the upstream did not send: aiohttp's `Server` and its default
    `Content-Type: application/octet-stream` are not the upstream's.  (`Date` may be
    added: RFC 9110 §6.6.1 has a proxy add it to an answer without one.)"""
    sent = [(b"Set-Cookie", b"a=1"), (b"X-Z", b"1"), (b"Set-Cookie", b"b=2; Path=/"), (b"x-lower", b"v"), (b"X-Empty", b"")]
    fields = b"".join(b"%s: %s\r\n" % field for field in sent)
    async with RecordingUpstream(
        b"HTTP/1.1 201 Very Created\r\n" + fields + b"Connection: close, X-Hop\r\nX-Hop: h\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 299 \r\nServer: upstream/1\r\nContent-Type: text/x-upstream\r\nContent-Length: 2\r\n\r\nok",
    ) as upstream:
        meter = await start_meter(upstream.url)
        request = b"GET /v1/models HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        first, chunked, named = [await exchange(port_of(meter), request) for _ in range(3)]
    assert first.startswith(b"HTTP/1.1 201 Very Created\r\n") and first.endswith(b"\r\n\r\nok")
    kept = [(name, value) for name, value in head_fields(first) if name not in (b"Date", b"Connection")]
    assert kept == [*sent, (b"Content-Length", b"2")]
    assert [name for name, _ in head_fields(chunked) if name not in (b"Date", b"Connection")] == [b"Transfer-Encoding"]
    assert named.startswith(b"HTTP/1.1 299 \r\n")
    assert [(n, v) for n, v in head_fields(named) if n in (b"Server", b"Content-Type")] == [(b"Server", b"upstream/1"), (b"Content-Type", b"text/x-upstream")]


def response_body(usage: dict[str, int]) -> bytes:
    return json.dumps({"id": "resp_1", "object": "response", "model": "gpt-4o", "status": "completed", "output": [], "usage": usage}).encode()


ENCODERS = {"gzip": gzip.compress, "br": brotli.compress, "zstd": zstandard.ZstdCompressor().compress}


async def test_encoded_answers_reach_the_client_undecoded(start_meter) -> None:
    """gzip, br and zstd answers: the client gets the upstream's encoded bytes; meter
    decodes only its own copy, to meter the usage."""
    usage = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}
    encoded = {coding: encode(response_body(usage)) for coding, encode in ENCODERS.items()}
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (coding.encode(), len(body), body)
        for coding, body in encoded.items()
    ]
    async with RecordingUpstream(*answers) as upstream:
        meter = await start_meter(upstream.url)
        request = b'POST /v1/responses HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip, br, zstd\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}'
        through = [await exchange(port_of(meter), request) for _ in encoded]
    for coding, answer in zip(encoded, through, strict=True):
        assert (b"Content-Encoding", coding.encode()) in head_fields(answer)
        assert answer.split(b"\r\n\r\n", 1)[1] == encoded[coding]
    rows = await meter.rows()
    assert [(row["input_tokens"], row["output_tokens"], row["response_bytes"]) for row in rows] == [(11, 7, len(body)) for body in encoded.values()]


async def test_a_cut_answer_never_looks_whole(start_meter) -> None:
    """An upstream that closes mid-body: whatever framing the client gets, it must be
    able to tell.  With a length or chunks the framing shows it; an HTTP/1.0 client
    reads an answer without a length until the connection closes, so only a reset
    tells it the answer was cut.  The row says the upstream broke off."""
    cut_chunked = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n"]
    async with RecordingUpstream(cut_chunked) as upstream:
        meter = await start_meter(upstream.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(meter))
        writer.write(b"GET /v1/models HTTP/1.0\r\n\r\n")
        received = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                received += chunk
        writer.close()
        answer_11 = await exchange(port_of(meter), b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n")
    assert received.startswith(b"HTTP/1.0 200 OK\r\n") and b"Content-Length" not in received
    assert answer_11.endswith(b"\r\n\r\n7\r\npartial\r\n")  # no last chunk: cut
    rows = await meter.rows()
    assert [(row["status_code"], row["outcome"], row["error_type"], row["response_bytes"]) for row in rows] == [(200, "error", "upstream_disconnected", 7)] * 2


async def test_a_compressed_upload_reaches_the_upstream_as_sent(start_meter) -> None:
    """A request body with a Content-Encoding is forwarded encoded, as it came (the
    upstream decodes it, or refuses it); meter decodes only its own copy, to read the
    request's metadata.  A body that is not what its coding says goes on untouched
    too: it is the upstream's to refuse, and so does one that decodes to more than
    meter takes in a request (a bomb), its metadata unread."""
    request_json = json.dumps({"model": "gpt-4o", "input": "hi", "metadata": {"team": "zipped"}}).encode()
    bomb = gzip.compress(json.dumps({"model": "gpt-4o", "input": " " * (1 << 20), "metadata": {"team": "zipped"}}).encode())
    answer = response_body({"input_tokens": 3, "output_tokens": 1, "total_tokens": 4})
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
    uploads = [(coding, encode(request_json)) for coding, encode in ENCODERS.items()] + [("gzip", b"not gzip at all"), ("gzip", bomb)]
    async with RecordingUpstream(ok) as upstream:
        meter = await start_meter(upstream.url, max_request_bytes=1 << 16)
        for coding, body in uploads:
            head = b"POST /v1/responses HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            through = await exchange(port_of(meter), head % (coding.encode(), len(body)) + body)
            assert through.startswith(b"HTTP/1.1 200 OK\r\n"), through[:300]
    assert [request.split(b"\r\n\r\n", 1)[1] for request in upstream.requests] == [body for _, body in uploads]
    rows = await meter.rows()
    assert [json.loads(row["tags"] or "{}") for row in rows] == [{"team": "zipped"}] * 3 + [{}, {}]
    assert [row["request_bytes"] for row in rows] == [len(body) for _, body in uploads]
    assert meter.meter.proxy.buffered_request_bytes == 0  # the decoded copies' share is given back


async def test_a_compressed_upload_is_decoded_off_the_event_loop(start_meter) -> None:
    """A few KB of gzip expand to meter's limit (64 MiB): decoding its copy takes a tenth
    of a second or more, which every stream on the loop would wait through."""
    import time

    from meter.observe.codings import decoded_copy

    # Past the limit once decoded: the copy is decoded up to the limit and then dropped,
    # so no parse of it follows (reading a large body's facts is the loop's, as for any body).
    body = gzip.compress(b'{"model": "gpt-4o", "input": "hi"}' + b" " * (60 << 20), compresslevel=9)
    started = time.perf_counter()
    assert decoded_copy(body, "gzip", 32 << 20) == b""
    decoding = time.perf_counter() - started  # what the loop would be held for, on this machine now
    async with RecordingUpstream() as upstream:
        meter = await start_meter(upstream.url, max_request_bytes=32 << 20)
        gaps: list[float] = []
        done = asyncio.Event()

        async def watch() -> None:  # the loop's longest wait between two turns
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        watcher = asyncio.create_task(watch())
        head = b"POST /v1/responses HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        through = await exchange(port_of(meter), head % len(body) + body)
        done.set()
        await watcher
    assert through.startswith(b"HTTP/1.1 200 OK\r\n")
    assert max(gaps) < decoding / 2, f"the loop waited {max(gaps) * 1000:.0f} ms; decoding alone takes {decoding * 1000:.0f} ms"


async def test_control_characters_in_the_answer_head_become_spaces(start_meter) -> None:
    """A control character in the upstream's reason phrase or a field value (invalid,
    and refused by aiohttp's writer): the answer is relayed with each one replaced by
    a space, as RFC 9110 §5.5 allows a recipient to, its body and row intact.  A tab
    is valid there, and stays."""
    answer = b"HTTP/1.1 200 A\x01B\tC\r\nX-Ctl: a\x02b\x7fc\x1fd\te\r\nContent-Length: 2\r\n\r\nok"
    async with RecordingUpstream(answer) as upstream:
        meter = await start_meter(upstream.url)
        through = await exchange(port_of(meter), b"GET /v1/models HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert through.startswith(b"HTTP/1.1 200 A B\tC\r\n"), through[:200]
    assert (b"X-Ctl", b"a b c d\te") in head_fields(through)
    assert through.endswith(b"\r\n\r\nok")
    [row] = await meter.rows()
    assert (row["status_code"], row["outcome"], row["response_bytes"]) == (200, "completed", 2)


async def test_an_upstream_with_userinfo_takes_the_clients_authorization(start_meter) -> None:
    """`--upstream http://user:password@gateway`: a request without Authorization goes
    with the gateway's credentials (Basic), one with its own Authorization goes with
    that, as sent, instead of failing on the two (a 502 for every API call)."""
    async with RecordingUpstream() as upstream:
        meter = await start_meter(upstream.url.replace("http://", "http://gw:s3cret@"))
        keyed = await exchange(port_of(meter), b"GET /v1/models HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer sk-own-key\r\nConnection: close\r\n\r\n")
        bare = await exchange(port_of(meter), b"GET /v1/models HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert keyed.startswith(b"HTTP/1.1 200 OK\r\n") and bare.startswith(b"HTTP/1.1 200 OK\r\n"), keyed[:300]
    host = b"Host: " + upstream.host() + b"\r\n"
    assert upstream.requests == [
        b"GET /v1/models HTTP/1.1\r\n" + host + b"Authorization: Bearer sk-own-key\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n" + host + b"Authorization: Basic Z3c6czNjcmV0\r\n\r\n",
    ]


@pytest.mark.parametrize("status", [b"302 Found", b"307 Temporary Redirect", b"308 Permanent Redirect"])
async def test_an_upstream_redirect_is_relayed_never_followed(start_meter, status: bytes) -> None:
    """The client gets the redirect as sent; the host it names is never contacted
    (a followed redirect would carry the client's key there)."""
    async with RecordingUpstream() as elsewhere:
        answer = b"HTTP/1.1 %s\r\nLocation: %s/v1/models\r\nContent-Length: 0\r\n\r\n" % (status, elsewhere.url.encode())
        async with RecordingUpstream(answer) as upstream:
            meter = await start_meter(upstream.url)
            request = b"POST /v1/models HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer sk-key\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            through = await exchange(port_of(meter), request)
    assert through.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert (b"Location", elsewhere.url.encode() + b"/v1/models") in head_fields(through)
    assert len(upstream.requests) == 1 and elsewhere.requests == []


class ResettingUpstream(SocketServer):
    """Sends `answer`, waits a moment, then resets the connection (or, with `reset`
    False, closes it the orderly way)."""

    def __init__(self, answer: bytes, *, reset: bool = True) -> None:
        super().__init__()
        self.answer = answer
        self.reset = reset

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        await asyncio.sleep(0.3)  # the answer's bytes first, on their own (a loaded machine's meter may be slow to read them)
        if self.reset:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
async def test_an_answer_that_ends_with_its_connection_is_cut_by_a_reset(start_meter, reset: bool) -> None:
    """An answer without a length or chunks ends where its connection does: an orderly
    close ends it whole, a reset cuts it, and the client must see the cut (no last
    chunk) and the row say the upstream broke off."""
    async with ResettingUpstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npartial", reset=reset) as upstream:
        meter = await start_meter(upstream.url)
        through = await exchange(port_of(meter), b"GET /v1/models HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert through.split(b"\r\n\r\n", 1)[1] == (b"7\r\npartial\r\n" if reset else b"7\r\npartial\r\n0\r\n\r\n")
    [row] = await meter.rows()
    outcome = ("error", "upstream_disconnected") if reset else ("completed", None)
    assert (row["outcome"], row["error_type"], row["response_bytes"]) == (*outcome, 7)
