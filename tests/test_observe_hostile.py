"""The observer against what a hostile (or merely large) upstream can send.

Memory held for metering is bounded by `max_bytes` whatever the answer: a
decompressed copy, one SSE event, one JSON body.  Usage is still read from a
terminal event or a body of any size, and when it cannot be read the
observation says why (`unmetered`) instead of recording a silent NULL.

Most tests drive the pure observer with plain bytes; the gzip bomb also goes
through a real `meter serve` and a real upstream process (this file run as a
module), and meter's peak RSS is read from /proc.
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import struct
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.observe import SSEObserver, observer_for

from .conftest import FIXTURES, UpstreamProcess, ledger_rows

MiB = 1 << 20
USAGE = {"input_tokens": 1234, "input_tokens_details": {"cached_tokens": 200}, "output_tokens": 567, "output_tokens_details": {"reasoning_tokens": 89}, "total_tokens": 1801}


# --- bodies and events, built in pieces so the test itself holds little ---------------


def _response_parts(filler: int, usage_first: bool = False, piece: int = MiB) -> Iterator[bytes]:
    """A Responses object whose output holds `filler` bytes, in OpenAI's key order
    (usage after output), or with usage first as the background fixtures have it."""
    usage = json.dumps(USAGE).encode()
    head = b'{"id":"resp_big","object":"response","created_at":1,"status":"completed","background":false,"instructions":"be brief","model":"gpt-image-x"'
    if usage_first:
        head = b'{"truncation":"disabled","id":"resp_big","usage":' + usage + b',"status":"completed","model":"gpt-image-x"'
    yield head + b',"output":[{"type":"image_generation_call","status":"completed","result":"'
    left = filler
    block = b"QUJD" * (piece // 4)
    while left > 0:
        yield block[: min(piece, left)]
        left -= piece
    tail = b'"}],"parallel_tool_calls":true,"service_tier":"priority","tools":[{"type":"image_generation"}],"truncation":"disabled"'
    if not usage_first:
        tail += b',"usage":' + usage
    yield tail + b',"user":null,"metadata":{"usage":"not this one"}}'


def _terminal_event_parts(filler: int, usage_first: bool = False, crlf: bool = False) -> Iterator[bytes]:
    end = b"\r\n" if crlf else b"\n"
    created = {"type": "response.created", "response": {"id": "resp_big", "model": "gpt-image-x", "status": "in_progress", "service_tier": "auto"}}
    yield b"event: response.created" + end + b"data: " + json.dumps(created).encode() + end + end
    yield b"event: response.output_text.delta" + end + b'data: {"type":"response.output_text.delta","delta":"a"}' + end + end
    yield b"event: response.completed" + end + b'data: {"type":"response.completed","sequence_number":9,"response":'
    yield from _response_parts(filler, usage_first)
    yield b"}" + end + end


def _rechunk(parts: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes cut into pieces of `size`, as a slow connection delivers them."""
    for part in parts:
        for i in range(0, len(part), size):
            yield part[i : i + size]


def _peak_while(feed: Callable[[], object]) -> tuple[object, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = feed()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_usage(obs) -> None:  # type: ignore[no-untyped-def]
    assert obs.usage is not None, obs
    u = obs.usage
    assert (u.input_tokens, u.cached_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens) == (1234, 200, 567, 89, 1801)
    assert obs.unmetered is None


# --- every content coding a client may ask for -------------------------------------


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


CODINGS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # RFC 9110: zlib format
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    "gzip, br": lambda b: brotli.compress(gzip.compress(b)),  # applied left to right
    "zstd,gzip": lambda b: gzip.compress(zstandard.ZstdCompressor().compress(b)),
    "identity": lambda b: b,
}


@pytest.mark.parametrize("coding", [*CODINGS, "deflate-raw"])
@pytest.mark.parametrize("piece", [1, 7, 1 << 16])
def test_every_coding_is_decoded_for_metering(coding: str, piece: int) -> None:
    body = b"".join(_response_parts(3000))
    if coding == "deflate-raw":  # what some servers send as `deflate`
        packed, header = _deflate_raw(body), "deflate"
    else:
        packed, header = CODINGS[coding](body), coding
    observer = observer_for("responses", "application/json", header)
    assert observer is not None
    for chunk in _rechunk([packed], piece):
        observer.feed(chunk)
    obs = observer.finish()
    _check_usage(obs)
    assert obs.unreadable is None and obs.service_tier == "priority"


def test_concatenated_gzip_members_and_zstd_frames() -> None:
    body = b"".join(_response_parts(5000))
    for coding, packed in (
        ("gzip", gzip.compress(body[:100]) + gzip.compress(body[100:])),
        ("zstd", zstandard.ZstdCompressor().compress(body[:100]) + zstandard.ZstdCompressor().compress(body[100:])),
    ):
        observer = observer_for("responses", "application/json", coding)
        observer.feed(packed)  # type: ignore[union-attr]
        _check_usage(observer.finish())  # type: ignore[union-attr]


def test_unknown_coding_is_unmetered_not_an_error() -> None:
    observer = observer_for("responses", "text/event-stream", "compress")
    assert observer is not None
    observer.feed(b"\x1f\x9d garbage")
    obs = observer.finish()
    assert obs.unmetered == "unknown_encoding"
    assert obs.unreadable is None and obs.error_type is None and obs.usage is None


@pytest.mark.parametrize("content_type", ["Application/JSON", "APPLICATION/JSON; charset=UTF-8", "application/vnd.openai+JSON"])
def test_a_json_content_type_is_read_in_any_case(content_type: str) -> None:
    """Media types are case-insensitive (RFC 9110 8.3.1): an upstream's
    `Application/JSON` answer was not observed at all, its usage lost unflagged."""
    observer = observer_for("responses", content_type, "")
    assert observer is not None
    for part in _response_parts(10):
        observer.feed(part)
    _check_usage(observer.finish())


def test_an_event_stream_content_type_is_read_in_any_case() -> None:
    observer = observer_for("responses", "Text/Event-Stream", "")
    assert isinstance(observer, SSEObserver)


@pytest.mark.parametrize("content_type", ["text/plain", "text/html; charset=utf-8", "application/octet-stream"])
def test_a_model_call_answered_in_another_type_is_flagged_unmetered(content_type: str) -> None:
    """A model call's answer in a type meter does not read is relayed as it is, and its
    row says why it has no usage (`unmetered`, `unknown_content_type`), as for a coding
    meter cannot decode: before, the row was a plain `completed` with no usage."""
    observer = observer_for("responses", content_type, "")
    assert observer is not None
    observer.feed(b'{"usage": {"input_tokens": 5}}')
    obs = observer.finish()
    assert obs.unmetered == "unknown_content_type"
    assert obs.unreadable is None and obs.error_type is None and obs.usage is None


def _gzip_parts(parts: Iterable[bytes]) -> Iterator[bytes]:
    c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for part in parts:
        out = c.compress(part)
        if out:
            yield out
    yield c.flush()


def test_gzip_body_past_max_bytes_is_read_without_holding_it() -> None:
    # 48 MiB of decoded JSON, max_bytes 1 MiB: usage read from the tail, and the
    # observer never holds more than a few MiB (today: the whole copy, then nothing).
    packed = list(_gzip_parts(_response_parts(48 * MiB)))

    def run() -> object:
        observer = observer_for("responses", "application/json", "gzip", max_bytes=MiB)
        for chunk in _rechunk(packed, 1 << 16):
            observer.feed(chunk)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    obs, peak = _peak_while(run)
    _check_usage(obs)
    assert (obs.response_id, obs.model, obs.status, obs.service_tier) == ("resp_big", "gpt-image-x", "completed", "priority")  # type: ignore[attr-defined]
    # ~2-3 MiB alone; tracemalloc also sees other threads a long test run leaves
    # behind (a ledger writer, a server), so the bound is set well under the 48 MiB
    # the copy would take whole, not at the observer's own figure.
    assert peak < 12 * MiB, peak


def _gzip_repeat(prefix: bytes, block: bytes, count: int, suffix: bytes) -> bytes:
    """gzip of prefix + block * count + suffix, built fast: after a full flush deflate
    starts afresh, so the block's compressed segment is the same each time."""
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)]
    segment = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    out += [segment] * count
    out.append(c.compress(suffix) + c.flush())
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(suffix, crc)
    out.append(struct.pack("<II", crc, (len(prefix) + len(block) * count + len(suffix)) & 0xFFFFFFFF))
    return b"".join(out)


BOMB_HEAD = b'{"id":"resp_bomb","object":"response","model":"gpt-image-x","status":"completed","output":[{"text":"'
BOMB_TAIL = b'"}],"usage":' + json.dumps(USAGE).encode() + b"}"


def _bomb(coding: str, inflated_mib: int) -> bytes:
    """A valid answer of `inflated_mib` MiB whose usage comes last, in a few kilobytes."""
    blanks = b" " * MiB
    if coding == "gzip":
        return _gzip_repeat(BOMB_HEAD, blanks, inflated_mib, BOMB_TAIL)
    if coding == "zstd":
        z = zstandard.ZstdCompressor(level=1).compressobj()
        return z.compress(BOMB_HEAD) + b"".join(z.compress(blanks) for _ in range(inflated_mib)) + z.compress(BOMB_TAIL) + z.flush()
    if coding == "br":
        b = brotli.Compressor(quality=1)
        return b.process(BOMB_HEAD) + b"".join(b.process(blanks) for _ in range(inflated_mib)) + b.process(BOMB_TAIL) + b.finish()
    assert coding == "gzip, br"
    return brotli.compress(_gzip_repeat(BOMB_HEAD, blanks, inflated_mib, BOMB_TAIL))


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "gzip, br"])
def test_decompression_bomb_stops_past_max_bytes(coding: str) -> None:
    # 1 GiB of blanks in a few kilobytes: decoding stops soon past max_bytes (had
    # it gone on, the usage at the end would have been read) and the observation
    # says why usage is missing.
    packed = _bomb(coding, 1024)
    assert len(packed) < 2 * MiB

    def run() -> object:
        observer = observer_for("responses", "application/json", coding, max_bytes=4 * MiB)
        for chunk in _rechunk([packed], 1 << 16):
            observer.feed(chunk)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    t0 = time.process_time()
    obs, peak = _peak_while(run)
    assert time.process_time() - t0 < 5
    assert obs.usage is None and obs.unmetered == "metered_bytes_limit"  # type: ignore[attr-defined]
    assert obs.model == "gpt-image-x"  # type: ignore[attr-defined]  # what was read is kept
    assert peak < 16 * MiB, peak


# --- SSE: bounded events, linear scans ----------------------------------------------


def test_long_line_in_small_reads_is_linear() -> None:
    # An 8 MiB event arriving 1 KiB at a time: today every read rescans (and
    # copies) everything held so far, which is quadratic.
    parts = list(_rechunk(_terminal_event_parts(8 * MiB), 1024))
    observer = observer_for("responses", "text/event-stream", "")
    t0 = time.process_time()
    for chunk in parts:
        observer.feed(chunk)  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert time.process_time() - t0 < 2.0
    _check_usage(obs)


def test_skipped_long_line_in_small_reads_is_linear() -> None:
    # A long comment (or any line meter does not read) is never held at all.
    parts = [b": " + b"x" * (8 * MiB) + b"\n\n", *_terminal_event_parts(100)]
    observer = observer_for("responses", "text/event-stream", "", max_bytes=MiB)
    t0 = time.process_time()
    for chunk in _rechunk(parts, 1024):
        observer.feed(chunk)  # type: ignore[union-attr]
    assert time.process_time() - t0 < 2.0
    _check_usage(observer.finish())  # type: ignore[union-attr]


def test_event_of_many_data_lines_is_bounded() -> None:
    # One event of 100 `data:` lines of 1 MiB each (today: all of it held, 300 lines took 989 MB).
    line = b"data: " + b"x" * MiB + b"\n"

    def run() -> object:
        observer = observer_for("responses", "text/event-stream", "", max_bytes=4 * MiB)
        observer.feed(b"event: response.in_progress\n")  # type: ignore[union-attr]
        observer.feed(b'data: {"type":"response.in_progress","response":{"id":"resp_1"}}\n')  # type: ignore[union-attr]
        for _ in range(100):
            observer.feed(line)  # type: ignore[union-attr]
        observer.feed(b"\n")  # type: ignore[union-attr]
        for part in _terminal_event_parts(100):
            observer.feed(part)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    obs, peak = _peak_while(run)
    _check_usage(obs)
    assert peak < 12 * MiB, peak


@pytest.mark.parametrize("usage_first", [False, True])
@pytest.mark.parametrize("crlf", [False, True])
def test_terminal_event_of_100_mib_default_limit(usage_first: bool, crlf: bool) -> None:
    # Past 64 MiB (the default) only a head and a tail of the event are kept;
    # usage is read from whichever holds it.
    def run() -> object:
        observer = observer_for("responses", "text/event-stream", "")
        for part in _terminal_event_parts(100 * MiB, usage_first, crlf):
            observer.feed(part)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    obs, peak = _peak_while(run)
    _check_usage(obs)
    assert obs.terminal and obs.status == "completed"  # type: ignore[attr-defined]
    assert (obs.response_id, obs.model, obs.service_tier) == ("resp_big", "gpt-image-x", "priority")  # type: ignore[attr-defined]
    assert peak < 64 * MiB + 8 * MiB, peak


@pytest.mark.parametrize("usage_first", [False, True])
@pytest.mark.parametrize("piece", [1000, MiB])
def test_terminal_event_past_a_small_limit(usage_first: bool, piece: int) -> None:
    def run() -> object:
        observer = observer_for("responses", "text/event-stream", "", max_bytes=256 << 10)
        for chunk in _rechunk(_terminal_event_parts(8 * MiB, usage_first), piece):
            observer.feed(chunk)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    obs, peak = _peak_while(run)
    _check_usage(obs)
    assert (obs.response_id, obs.model, obs.service_tier) == ("resp_big", "gpt-image-x", "priority")  # type: ignore[attr-defined]
    assert peak < piece + 2 * MiB, peak


@pytest.mark.parametrize("crlf", [False, True])
def test_event_past_the_limit_in_one_chunk_is_not_copied(crlf: bool) -> None:
    # A whole 32 MiB event in one chunk (TCP coalesces, a test client writes at
    # once): read through a view, only its head and tail are copied.
    chunk = b"".join(_terminal_event_parts(32 * MiB, crlf=crlf))

    def run() -> object:
        observer = observer_for("responses", "text/event-stream", "", max_bytes=MiB)
        observer.feed(chunk)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    obs, peak = _peak_while(run)
    _check_usage(obs)
    assert peak < 4 * MiB, peak


def test_json_body_of_100_mib_default_limit() -> None:
    def run() -> object:
        observer = observer_for("responses", "application/json", "")
        for part in _response_parts(100 * MiB):
            observer.feed(part)  # type: ignore[union-attr]
        return observer.finish()  # type: ignore[union-attr]

    obs, peak = _peak_while(run)
    _check_usage(obs)
    assert (obs.response_id, obs.model, obs.status, obs.service_tier) == ("resp_big", "gpt-image-x", "completed", "priority")  # type: ignore[attr-defined]
    assert peak < 64 * MiB + 8 * MiB, peak


def test_oversized_terminal_event_without_readable_usage_says_so() -> None:
    observer = observer_for("responses", "text/event-stream", "", max_bytes=64 << 10)
    observer.feed(b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r","status":"completed","output":"')  # type: ignore[union-attr]
    observer.feed(b"x" * MiB + b'"}}\n\n')  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert obs.usage is None and obs.terminal and obs.response_id == "r"
    assert obs.unmetered == "oversized_event"


def test_json_body_past_the_limit_without_usage_says_so() -> None:
    observer = observer_for("chat", "application/json", "", max_bytes=64 << 10)
    observer.feed(b'{"id":"c","object":"chat.completion","model":"m","choices":[{"message":{"content":"')  # type: ignore[union-attr]
    observer.feed(b"x" * MiB + b'"}}]}')  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert obs.usage is None and obs.model == "m"
    assert obs.unmetered == "metered_bytes_limit"


def test_fixture_streams_read_the_same_past_a_tiny_limit() -> None:
    # Every recorded stream, with max_bytes so small that each terminal event is
    # read from its head and tail only: usage and id as recorded, whether the
    # serialisation puts usage after `output` (most) or first (background streams).
    checked = 0
    for path in sorted((FIXTURES / "openai").glob("*.json")):
        for inter in json.loads(path.read_text())["interactions"]:
            resp, expected = inter["response"], inter["expected"]
            if not (resp["stream"] and resp["status"] == 200 and expected["usage"]) or "chat" in inter["request"]["path"]:
                continue
            observer = observer_for("responses", "text/event-stream", "", max_bytes=1024)
            observer.feed(resp["body"].encode())  # type: ignore[union-attr]
            obs = observer.finish()  # type: ignore[union-attr]
            assert obs.usage is not None, path.name
            assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.total_tokens) == (
                expected["usage"]["input_tokens"],
                expected["usage"]["output_tokens"],
                expected["usage"]["total_tokens"],
            ), path.name
            assert obs.response_id == expected["response_id"], path.name
            # The served tier comes before `tools`, which may not fit a 512-byte tail:
            # it may be missing, never wrong.
            assert obs.service_tier in (None, expected.get("service_tier")), path.name
            checked += 1
    assert checked >= 10


def _fixture_streams() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((FIXTURES / "openai").glob("*.json")):
        for inter in json.loads(path.read_text())["interactions"]:
            if inter["response"]["stream"] and inter["response"]["status"] == 200 and inter["expected"]["usage"]:
                out.append((path.name, inter))
    return out


FIXTURE_STREAMS = _fixture_streams()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=10_000),
    cuts=st.lists(st.integers(min_value=0, max_value=10**9), max_size=40),
    crlf=st.booleans(),
    limit=st.sampled_from([1024, 4096, 64 << 20]),
)
def test_any_split_past_any_limit_reads_the_same_usage(index: int, cuts: list[int], crlf: bool, limit: int) -> None:
    # Lines and events cut anywhere, fields split inside `data:` and `event:`, CRs
    # split from their LFs, events past the limit or not: the same usage.
    name, inter = FIXTURE_STREAMS[index % len(FIXTURE_STREAMS)]
    body = inter["response"]["body"].replace("\n", "\r\n") if crlf else inter["response"]["body"]
    data = body.encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    kind = "chat" if "chat" in inter["request"]["path"] else "responses"
    observer = observer_for(kind, "text/event-stream", "", max_bytes=limit)
    last = 0
    for p in [*points, len(data)]:
        observer.feed(data[last:p])  # type: ignore[union-attr]
        last = p
    obs = observer.finish()  # type: ignore[union-attr]
    expected = inter["expected"]["usage"]
    assert obs.usage is not None, name
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.total_tokens) == (expected["input_tokens"], expected["output_tokens"], expected["total_tokens"]), name
    assert obs.unreadable is None and obs.unmetered is None


# --- Chat Completions -----------------------------------------------------------------


def _chat(*chunks: dict | str) -> bytes:
    return b"".join(b"data: " + (c.encode() if isinstance(c, str) else json.dumps(c).encode()) + b"\n\n" for c in chunks)


CHAT_HEAD = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
CHAT_TOKEN = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}


@pytest.mark.parametrize("split", [False, True])
def test_chat_error_chunk_after_the_first_token_is_recorded(split: bool) -> None:
    body = _chat(CHAT_HEAD, CHAT_TOKEN, CHAT_TOKEN, {"error": {"message": "The server had an error", "type": "server_error", "code": "internal_error"}})
    observer = SSEObserver("chat")
    for chunk in _rechunk([body], 5) if split else [body]:
        observer.feed(chunk)
    obs = observer.finish()
    assert (obs.error_type, obs.error_code) == ("server_error", "internal_error")
    assert obs.first_token_at is not None


def test_chat_stream_without_include_usage_is_unmetered() -> None:
    observer = observer_for("chat", "text/event-stream; charset=utf-8", "")
    observer.feed(_chat(CHAT_HEAD, CHAT_TOKEN, "[DONE]"))  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert obs.terminal and obs.usage is None and obs.model == "gpt-4o-mini"
    assert obs.unmetered == "no_include_usage"


def test_chat_stream_with_usage_is_metered() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    observer = observer_for("chat", "text/event-stream", "")
    observer.feed(_chat(CHAT_HEAD, CHAT_TOKEN, {**CHAT_TOKEN, "choices": [], "usage": usage}, "[DONE]"))  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert obs.usage is not None and obs.usage.total_tokens == 5 and obs.unmetered is None


def test_responses_stream_cut_before_its_terminal_event() -> None:
    observer = observer_for("responses", "text/event-stream", "")
    observer.feed(b"".join(list(_terminal_event_parts(10))[:2]))  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert obs.usage is None and not obs.terminal and obs.unmetered == "no_terminal_event"


# --- end to end: a gzip bomb through a real `meter serve` ----------------------------

BOMB_INFLATED = 512 * MiB


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _http_post(port: int, path: str, body: bytes, headers: dict[str, str], before_reading: Callable[[], object] | None = None) -> tuple[int, int]:
    """A raw HTTP/1.1 POST; returns the status and the number of body bytes read."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(head.encode() + body)
        if before_reading is not None:
            before_reading()
        data = b""
        while True:
            got = s.recv(1 << 16)
            if not got:
                break
            data += got
    status = int(data.split(b" ", 2)[1])
    return status, len(data) - data.index(b"\r\n\r\n") - 4


@pytest.fixture
def bomb_upstream() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess("tests.test_observe_hostile").start(timeout=60)
    yield proc
    proc.stop()


def test_gzip_bomb_through_meter_serve_holds_memory(bomb_upstream: UpstreamProcess, meter_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ledger = tmp_path / "ledger.duckdb"
    meter = meter_process("--upstream", bomb_upstream.url, "--ledger", str(ledger))
    assert meter.proc is not None
    body = json.dumps({"model": "gpt-image-x", "input": "draw"}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-bomb-0000", "Accept-Encoding": "gzip"}
    status, _ = _http_post(meter.port, "/v1/responses?small=1", body, headers)  # warm up every code path
    assert status == 200
    before = _peak_rss_kib(meter.proc.pid)
    status, got = _http_post(meter.port, "/v1/responses", body, headers)
    after = _peak_rss_kib(meter.proc.pid)
    assert status == 200 and got > 100_000  # the client received the compressed answer in full
    # The inflated body is 512 MiB; meter may hold max_bytes (64 MiB) of it, never all.
    print(f"meter's peak RSS grew by {(after - before) // 1024} MiB")
    assert (after - before) * 1024 < 160 * MiB, f"peak RSS grew by {(after - before) // 1024} MiB"
    meter.stop()
    rows = ledger_rows(ledger)
    assert len(rows) == 2
    assert rows[0]["total_tokens"] == 1801  # the small answer is metered as ever
    assert rows[1]["status_code"] == 200 and rows[1]["total_tokens"] is None


def test_max_metered_bytes_setting_reaches_the_observer(bomb_upstream: UpstreamProcess, meter_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ledger = tmp_path / "ledger.duckdb"
    meter = meter_process("--upstream", bomb_upstream.url, "--ledger", str(ledger), "--max-metered-bytes", str(4 * MiB))
    assert meter.proc is not None
    body = json.dumps({"model": "gpt-image-x", "input": "draw"}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-bomb-0000", "Accept-Encoding": "gzip"}
    assert _http_post(meter.port, "/v1/responses?small=1", body, headers)[0] == 200
    before = _peak_rss_kib(meter.proc.pid)
    assert _http_post(meter.port, "/v1/responses", body, headers)[0] == 200
    grown = (_peak_rss_kib(meter.proc.pid) - before) * 1024
    # At the default 64 MiB the same answer costs ~66 MiB; at 4 MiB, a few MiB.
    assert grown < 24 * MiB, f"peak RSS grew by {grown // MiB} MiB with --max-metered-bytes 4 MiB"
    meter.stop()
    rows = ledger_rows(ledger)
    assert rows[0]["total_tokens"] == 1801
    assert (rows[1]["outcome"], rows[1]["error_type"], rows[1]["error_code"]) == ("completed", "unmetered", "metered_bytes_limit")


def test_concurrent_large_answers_share_the_metering_budget(bomb_upstream: UpstreamProcess, meter_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 24 answers of ~6 MiB at once: each may be held whole (under --max-metered-bytes),
    # not all of them (--max-metered-bytes-total); the rest are read from their ends.
    from concurrent.futures import ThreadPoolExecutor

    ledger = tmp_path / "ledger.duckdb"
    meter = meter_process("--upstream", bomb_upstream.url, "--ledger", str(ledger), "--max-metered-bytes-total", str(4 * MiB))
    assert meter.proc is not None
    body = json.dumps({"model": "gpt-image-x", "input": "draw"}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-budget-0000"}
    assert _http_post(meter.port, "/v1/responses?big=1", body, headers)[0] == 200
    before = _peak_rss_kib(meter.proc.pid)
    # The clients read their answers only once all 24 are under way, so meter holds
    # the copies of all of them at once (the answers outgrow the socket buffers).
    start = threading.Barrier(24)

    def slow_reader(_: int) -> tuple[int, int]:
        return _http_post(meter.port, "/v1/responses?big=1", body, headers, before_reading=lambda: (start.wait(30), time.sleep(1.0)))

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(slow_reader, range(24)))
    grown = (_peak_rss_kib(meter.proc.pid) - before) * 1024
    print(f"peak RSS grew by {grown // MiB} MiB")
    assert all(status == 200 and got > 5 * MiB for status, got in answers)
    meter.stop()
    rows = ledger_rows(ledger)
    assert len(rows) == 25 and all(row["total_tokens"] == 1801 for row in rows)  # usage read whole or from the tail
    # Held whole, 24 answers took ~190 MiB here; the budget keeps the copies to a few MiB (relaying takes the rest).
    assert grown < 140 * MiB, f"peak RSS grew by {grown // MiB} MiB"


def _bomb_body() -> bytes:
    return _gzip_repeat(BOMB_HEAD, b"a" * MiB, BOMB_INFLATED // MiB, BOMB_TAIL)


def serve(port: int) -> None:
    """A tiny upstream: POST /v1/responses answers a gzip body; `?small=1` a normal one."""
    import asyncio

    from aiohttp import web

    bomb = _bomb_body()
    small = gzip.compress(b"".join(_response_parts(1000)))

    big = b"".join(_response_parts(6 * MiB))  # ~6 MiB of plain JSON, usage after the output
    served = [0]

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if request.query.get("big"):
            served[0] += 1  # a response id of its own, or usage would rightly count once
            return web.Response(body=big.replace(b"resp_big", b"resp_%03d" % served[0], 1), headers={"Content-Type": "application/json"})
        body = small if request.query.get("small") else bomb
        return web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/responses", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"READY http://127.0.0.1:{bound}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    serve(parser.parse_args().port)
    sys.exit(0)


# --- one budget for everything metered whole at once -------------------------------


def test_answers_share_one_metering_budget() -> None:
    # Each answer may hold max_bytes whole, but not all of them at once: past the
    # shared budget an answer is metered from its ends, like one past max_bytes.
    from meter.observe import MeteringBudget

    budget = MeteringBudget(6 * MiB)
    observers = [observer_for("responses", "application/json", "", max_bytes=4 * MiB, budget=budget) for _ in range(20)]
    for observer in observers:
        for part in _response_parts(3 * MiB):  # ~3 MiB of output, usage after it
            observer.feed(part)  # type: ignore[union-attr]
    held = 6 * MiB - budget.free
    assert 0 <= held <= 6 * MiB
    whole = [o for o in observers if o.tail is None]  # type: ignore[union-attr]
    assert 1 <= len(whole) <= 2  # 6 MiB holds two answers of ~3 MiB; the rest keep their ends
    for observer in observers:
        _check_usage(observer.finish())  # type: ignore[union-attr]
    assert budget.free == 6 * MiB  # every answer gave its bytes back


def test_an_abandoned_answer_gives_its_budget_back() -> None:
    from meter.observe import MeteringBudget

    budget = MeteringBudget(8 * MiB)
    sse = observer_for("responses", "text/event-stream", "", max_bytes=4 * MiB, budget=budget)
    body = observer_for("responses", "application/json", "gzip", max_bytes=4 * MiB, budget=budget)
    parts = list(_terminal_event_parts(2 * MiB))
    sse.feed(b"".join(parts)[:-100])  # type: ignore[union-attr]  # the terminal event, unfinished
    body.feed(gzip.compress(b"".join(_response_parts(2 * MiB)))[:-20])  # type: ignore[union-attr]
    assert budget.free < 8 * MiB
    sse.release()  # type: ignore[union-attr]  # the client went away: the proxy lets go
    body.release()  # type: ignore[union-attr]
    assert budget.free == 8 * MiB


def test_a_crlf_blank_line_split_between_its_cr_and_lf_ends_the_event() -> None:
    # Found by the property test: the CR of the blank line ending one chunk, its LF
    # opening the next, once glued two events' data into one undecodable payload.
    created = b'event: response.created\r\ndata: {"type":"response.created","response":{"id":"resp_1","status":"in_progress","model":"m"}}\r\n\r'
    rest = (
        b'\nevent: response.completed\r\ndata: {"type":"response.completed","response":{"id":"resp_1","status":"completed","model":"m",'
        b'"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}}\r\n\r\n'
    )
    observer = observer_for("responses", "text/event-stream", "")
    observer.feed(created)  # type: ignore[union-attr]
    observer.feed(rest)  # type: ignore[union-attr]
    obs = observer.finish()  # type: ignore[union-attr]
    assert obs.unreadable is None and obs.usage is not None and obs.usage.total_tokens == 5
