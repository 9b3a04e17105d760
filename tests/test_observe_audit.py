"""Reading usage out of answers in the framings and shapes SSE and the APIs allow.

- Framing: the SSE standard (WHATWG HTML, "Server-sent events") ends a line with
  CRLF, LF or a lone CR, and drops one U+FEFF byte order mark at the start of a
  stream.  The same events in another framing, cut anywhere, read as the usual
  LF framing does.
- The first token is the first output of any kind; an unnamed event is read by
  its `type` wherever that is; an `error` event does not hide a
  `response.failed` after it.
- A model call that ended without reporting usage is counted unmetered, not
  taken for one that used nothing.
- End to end, through a running meter: relayed as sent, metered and priced.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest

from meter.observe import Observation, SSEObserver, observe_json_body, observer_for

from .conftest import SECRET_KEY
from .socket_server import SocketServer

BOM = b"\xef\xbb\xbf"
TEXT = "h\u00e9llo \u2713 \u65e5\u672c"  # two- and three-byte UTF-8 characters, for cuts inside one
RESPONSES_USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 10},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 5},
    "total_tokens": 120,
}


def responses_events() -> list[tuple[str | None, dict[str, Any]]]:
    response = {"id": "resp_1", "object": "response", "model": "gpt-5-2025-08-07", "status": "in_progress", "service_tier": "auto", "usage": None}
    final = {**response, "status": "completed", "service_tier": "priority", "output": [{"type": "message", "content": [{"type": "output_text", "text": TEXT}]}],
             "usage": RESPONSES_USAGE, "tool_usage": {"web_search": {"num_requests": 2}}}  # fmt: skip
    return [
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": response}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1, "delta": TEXT}),
        ("response.output_text.done", {"type": "response.output_text.done", "sequence_number": 2, "text": TEXT}),
        ("response.completed", {"type": "response.completed", "sequence_number": 3, "response": final}),
    ]


def chat_events() -> list[tuple[str | None, dict[str, Any]]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06", "service_tier": "default"}
    usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 2}}
    return [
        (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], "usage": None}),
        (None, {**base, "choices": [{"index": 0, "delta": {"content": TEXT}, "finish_reason": None}], "usage": None}),
        (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
        (None, {**base, "choices": [], "usage": usage}),
    ]


def framed(events: Iterable[tuple[str | None, dict[str, Any]]], eol: str = "\n", done: bool = False) -> bytes:
    """The events as an SSE body whose every line ends with `eol`."""
    out = ""
    for name, data in events:
        if name is not None:
            out += f"event: {name}{eol}"
        out += f"data: {json.dumps(data, ensure_ascii=False)}{eol}{eol}"
    if done:
        out += f"data: [DONE]{eol}{eol}"
    return out.encode()


def reading(kind: str, pieces: Iterable[bytes]) -> dict[str, Any]:
    """What an observer fed `pieces` one by one reads, as comparable values."""
    observer = SSEObserver(kind)
    for piece in pieces:
        observer.feed(piece)
    obs: Observation = observer.finish()
    return {
        "model": obs.model,
        "response_id": obs.response_id,
        "service_tier": obs.service_tier,
        "status": obs.status,
        "usage": obs.usage,
        "first_token": obs.first_token_at is not None,
        "terminal": obs.terminal,
        "unmetered": obs.unmetered,
        "unreadable": obs.unreadable,
    }


def every_cut(data: bytes) -> Iterable[list[bytes]]:
    """The body cut in two at every byte, and byte by byte."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


STREAMS = {"responses": (responses_events, False), "chat": (chat_events, True)}


@pytest.mark.parametrize("kind", STREAMS)
def test_the_lf_framing_reads_usage_identity_and_the_first_token(kind: str) -> None:
    events, done = STREAMS[kind]
    read = reading(kind, [framed(events(), done=done)])
    assert read["usage"] is not None and read["usage"].input_tokens == (100 if kind == "responses" else 10)
    assert read["first_token"] and read["terminal"] and read["unmetered"] is None
    assert read["service_tier"] == ("priority" if kind == "responses" else "default")


@pytest.mark.parametrize("kind", STREAMS)
@pytest.mark.parametrize("eol", ["\r", "\r\n"], ids=["cr", "crlf"])
def test_lines_ended_by_cr_or_crlf_read_as_lf_at_every_cut(kind: str, eol: str) -> None:
    events, done = STREAMS[kind]
    expected = reading(kind, [framed(events(), done=done)])
    data = framed(events(), eol, done)
    for pieces in every_cut(data):
        assert reading(kind, pieces) == expected, [len(p) for p in pieces]


@pytest.mark.parametrize("kind", STREAMS)
def test_a_stream_of_mixed_line_ends_reads_as_lf(kind: str) -> None:
    """The standard lets one stream mix them; each event here ends its lines its own way."""
    events, done = STREAMS[kind]
    expected = reading(kind, [framed(events(), done=done)])
    mixed = b"".join(framed([e], eol) for e, eol in zip(events(), ["\r", "\n", "\r\n", "\r"])) + (b"data: [DONE]\r\r" if done else b"")
    for pieces in every_cut(mixed):
        assert reading(kind, pieces) == expected, [len(p) for p in pieces]


@pytest.mark.parametrize("eol", ["\r", "\n", "\r\n"], ids=["cr", "lf", "crlf"])
def test_the_last_event_without_its_blank_line_is_read(eol: str) -> None:
    events, _ = STREAMS["responses"]
    expected = reading("responses", [framed(events())])
    data = framed(events(), eol)[: -len(eol)]
    assert reading("responses", [data]) == expected
    assert reading("responses", [data[: len(data) // 2], data[len(data) // 2 :]]) == expected


def single_chunk_chat() -> bytes:
    """A whole Chat Completions answer in one chunk, usage included, as some upstreams stream a short one."""
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06", "service_tier": "default",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}  # fmt: skip
    return framed([(None, chunk)], done=True)


@pytest.mark.parametrize("kind,data", [("chat", single_chunk_chat()), ("chat", framed(chat_events(), done=True)), ("responses", framed(responses_events()))],
                         ids=["chat-one-chunk", "chat", "responses"])  # fmt: skip
def test_a_byte_order_mark_at_the_start_is_dropped_at_every_cut(kind: str, data: bytes) -> None:
    expected = reading(kind, [data])
    assert expected["usage"] is not None and expected["model"] is not None
    for pieces in every_cut(BOM + data):
        assert reading(kind, pieces) == expected, [len(p) for p in pieces]


def test_a_byte_order_mark_after_the_start_is_no_mark() -> None:
    """Only the stream's first bytes can be one: later, the bytes are a line's own."""
    data = framed(chat_events()[:3]) + BOM + framed(chat_events()[3:], done=True)
    read = reading("chat", [data])
    assert read["usage"] is None and read["unmetered"] == "no_include_usage"


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_a_crlf_data_line_cut_between_its_cr_and_lf_keeps_no_cr(include_usage: bool) -> None:
    """`data: [DONE]\\r` then `\\n\\r\\n`: the CR is its CRLF's, not the data's, so the
    stream's end is seen (a chunk held `[DONE]\\r`, and a stream without usage was
    counted as cut short instead of as one that asked for none)."""
    events = chat_events() if include_usage else chat_events()[:3]
    data = framed(events, "\r\n", done=True)
    cut = len(data) - 3
    assert data[cut - 1 : cut + 1] == b"\r\n"
    read = reading("chat", [data[:cut], data[cut:]])
    assert read["terminal"]
    assert read["unmetered"] == (None if include_usage else "no_include_usage")


# --- through a running meter ------------------------------------------------------------

Step = bytes | float  # bytes to write, or seconds to wait


class ScriptedUpstream(SocketServer):
    """Answers every request on a connection with the same scripted steps."""

    def __init__(self, answer: list[Step]) -> None:
        super().__init__()
        self.answer = answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                for step in self.answer:
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def sse_answer(body: bytes, coding: str | None, piece: int) -> list[Step]:
    """An HTTP answer streaming `body` (encoded with `coding`, flushed as it goes) in
    `piece`-byte writes, chunked, then the connection closed."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
    if coding is not None:
        head += b"Content-Encoding: %s\r\n" % coding.encode()
    parts = [body[i : i + piece] for i in range(0, len(body), piece)]
    if coding == "gzip":
        packer = zlib.compressobj(wbits=31)
        parts = [packer.compress(p) + packer.flush(zlib.Z_SYNC_FLUSH) for p in parts] + [packer.flush()]
    steps: list[Step] = [head + b"\r\n"]
    steps += [b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p]
    steps.append(b"0\r\n\r\n")
    return steps


@pytest.mark.parametrize("coding", [None, "gzip"])
async def test_a_cr_framed_stream_through_meter_is_relayed_as_sent_and_metered(start_meter: Any, coding: str | None) -> None:
    """The official SDK reads a stream whose lines end with a lone CR (its decoder
    follows the standard); meter relays it untouched and meters its usage."""
    body = BOM + framed(responses_events(), "\r")
    answer = sse_answer(body, coding, 37)
    sent = b"".join(step.split(b"\r\n", 1)[1][:-2] for step in answer[1:-1] if isinstance(step, bytes))  # the body, unchunked
    async with ScriptedUpstream(answer) as upstream:
        meter = await start_meter(upstream.url)
        client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=SECRET_KEY, max_retries=0)
        stream = await client.responses.create(model="gpt-5", input="hi", stream=True, service_tier="priority")
        kinds = [event.type async for event in stream]
        await client.close()
        headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.post(meter.url + "/v1/responses", data=b'{"model":"gpt-5","stream":true}', headers=headers) as r,
        ):
            relayed = await r.read()
    assert kinds == ["response.created", "response.output_text.delta", "response.output_text.done", "response.completed"]
    assert relayed == sent
    row, again = await meter.rows()
    assert again["input_tokens"] == 100 and again["service_tier"] == "priority"
    assert (row["outcome"], row["error_type"], row["model"], row["service_tier_requested"], row["service_tier"]) == (
        "completed", None, "gpt-5-2025-08-07", "priority", "priority",
    )  # fmt: skip
    assert (row["input_tokens"], row["cached_tokens"], row["cache_write_tokens"], row["output_tokens"], row["reasoning_tokens"]) == (100, 40, 10, 20, 5)
    assert row["web_search_calls"] == 2 and row["ttft_ms"] is not None
    # gpt-5 on the priority tier (genai-prices): $2.50 per million input tokens, $0.25
    # cached (cache writes, which it has no rate for, at the input rate), $20 output
    # (reasoning included), $10 per thousand web searches.
    expected = (Decimal("2.5") * 50 + Decimal("0.25") * 40 + Decimal("2.5") * 10 + Decimal(20) * 20) / 10**6 + Decimal("0.01") * 2
    assert row["cost_usd"] == expected


def first_token_chunk(kind: str, events: list[tuple[str | None, dict[str, Any]]]) -> float | None:
    """At which chunk (1-based, one event each) the first token was noted."""
    fed = [0]
    observer = SSEObserver(kind, clock=lambda: float(fed[0]))
    for event in events:
        fed[0] += 1
        observer.feed(framed([event]))
    return observer.finish().first_token_at


@pytest.mark.parametrize(
    "delta",
    [
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}},  # the functions API
        {"role": "assistant", "audio": {"id": "audio_1", "data": "UklGR", "transcript": ""}},  # an audio model
        {"role": "assistant", "content": None, "reasoning": "Thinking"},  # a gateway's reasoning model
    ],
    ids=["function_call", "audio", "reasoning"],
)
def test_a_chat_stream_notes_its_first_token_at_its_first_output_of_any_kind(delta: dict[str, Any]) -> None:
    """`ttft_ms` is the first output delta (SPEC §3), not the first text: a stream of a
    legacy function call, of audio or of reasoning first had its first token noted
    late, or never."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
    events: list[tuple[str | None, dict[str, Any]]] = [
        (None, {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        (None, {**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}),
    ]
    assert first_token_chunk("chat", events) == 1.0


def test_a_chat_stream_role_chunk_is_no_first_token() -> None:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
    events: list[tuple[str | None, dict[str, Any]]] = [
        (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "function_call": None, "audio": None}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
    ]
    assert first_token_chunk("chat", events) == 2.0


# --- a model call that ended without usage ------------------------------------------------


def responses_body(status: str, usage: dict[str, Any] | None, **more: Any) -> bytes:
    return json.dumps({"id": "resp_1", "object": "response", "model": "gpt-4o-2024-08-06", "status": status, "usage": usage, **more}).encode()


CHAT_BODY = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}]}
EMBEDDINGS_BODY = {"object": "list", "model": "text-embedding-3-small", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]}


@pytest.mark.parametrize(
    "kind,body,unmetered",
    [
        ("responses", responses_body("completed", None), "no_usage"),
        ("responses", responses_body("incomplete", None), "no_usage"),
        ("chat", json.dumps(CHAT_BODY).encode(), "no_usage"),
        ("chat", json.dumps({**CHAT_BODY, "usage": None}).encode(), "no_usage"),
        ("chat", json.dumps(EMBEDDINGS_BODY).encode(), "no_usage"),
        # What is no consumption, or says why there is none: nothing to count.
        ("responses", responses_body("completed", RESPONSES_USAGE), None),
        ("chat", json.dumps({**CHAT_BODY, "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode(), None),
        ("responses", responses_body("queued", None, background=True), None),  # a background POST: usage comes later
        ("responses", responses_body("in_progress", None), None),
        ("responses", responses_body("failed", None, error={"code": "server_error", "message": "boom"}), None),
        ("responses", b'{"error": {"type": "invalid_request_error", "code": null, "message": "no"}}', None),
        ("chat", b'{"error": {"type": "invalid_request_error", "code": "bad", "message": "no"}}', None),
    ],
    ids=[
        "responses-completed", "responses-incomplete", "chat", "chat-usage-null", "embeddings",
        "responses-usage", "chat-usage", "background-queued", "in-progress", "failed-with-error", "responses-error", "chat-error",
    ],
)  # fmt: skip
def test_a_json_answer_that_ended_without_usage_is_unmetered(kind: str, body: bytes, unmetered: str | None) -> None:
    """A model call that ended without reporting usage is counted (SPEC §2b: usage is
    never lost silently), not recorded as one that used nothing: its row was neither
    unpriced (no usage) nor unmetered."""
    observer = observer_for(kind, "application/json", "")
    observer.feed(body)
    assert observer.finish().unmetered == unmetered
    assert observe_json_body(kind, body).unmetered == unmetered


def test_a_responses_stream_whose_terminal_event_has_no_usage_is_unmetered() -> None:
    events = responses_events()
    final = events[-1][1]
    events[-1] = (events[-1][0], {**final, "response": {**final["response"], "usage": None}})
    read = reading("responses", [framed(events)])
    assert read["terminal"] and read["usage"] is None and read["unmetered"] == "no_usage"


async def test_an_answer_without_usage_through_meter_is_counted_unmetered(upstream: Any, start_meter: Any) -> None:
    meter = await start_meter(upstream.url)
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=SECRET_KEY, max_retries=0, default_headers={"x-fake-usage": "null"})
    await client.responses.create(model="gpt-4o", input="hi")
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    rows = await meter.rows()
    assert [(r["endpoint"], r["outcome"], r["input_tokens"], r["error_type"], r["error_code"]) for r in rows] == [
        ("responses", "completed", None, "unmetered", "no_usage"),
        ("chat.completions", "completed", None, "unmetered", "no_usage"),
    ]


async def test_a_websocket_response_without_usage_is_counted_unmetered(upstream: Any, start_meter: Any) -> None:
    """Over a WebSocket as over HTTP; a warm-up (`generate: false`) carries no consumption
    and is not counted."""
    meter = await start_meter(upstream.url)
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    async with client.responses.connect() as conn:
        await conn.response.create(model="gpt-4o", input="warm up", generate=False)  # type: ignore[call-arg]
        async for event in conn:
            if event.type == "response.completed":
                break
        # The fake reads `fake_usage` as JSON; `null`: a response that reports no usage.
        await conn.response.create(model="gpt-4o", input="hi", metadata={"fake_usage": "null"})
        async for event in conn:
            if event.type == "response.completed":
                break
    await client.close()
    warm_up, answer = await meter.rows()
    assert (warm_up["outcome"], warm_up["input_tokens"], warm_up["error_type"]) == ("completed", None, None)
    assert (answer["outcome"], answer["input_tokens"], answer["error_type"], answer["error_code"]) == ("completed", None, "unmetered", "no_usage")


# --- an `error` event in a Responses stream ----------------------------------------------------


def error_event(nested: bool) -> tuple[str, dict[str, Any]]:
    """An `error` event: its error in an object, or (the older shape) its code and message at the top."""
    error = {"code": "server_error", "message": "The server had an error.", "param": None}
    if nested:
        return "error", {"type": "error", "sequence_number": 2, "error": {"type": "server_error", **error}}
    return "error", {"type": "error", "sequence_number": 2, **error}


@pytest.mark.parametrize("nested", [True, False], ids=["error-object", "top-level"])
def test_an_error_event_then_response_failed_keeps_the_usage_it_reports(nested: bool) -> None:
    """SSE's terminal events are `response.completed`, `.incomplete` and `.failed` (SPEC
    §3): a `response.failed` after an `error` event still brings the usage billed."""
    created, delta, _, completed = responses_events()
    failed = {**completed[1]["response"], "status": "failed", "service_tier": "default", "error": {"code": "server_error", "message": "The server had an error."}}
    events = [created, delta, error_event(nested), ("response.failed", {"type": "response.failed", "sequence_number": 3, "response": failed})]
    for pieces in ([framed(events)], [framed([e]) for e in events]):
        read = reading("responses", pieces)
        assert read["status"] == "failed" and read["terminal"] and read["unmetered"] is None
        assert read["usage"] is not None and read["usage"].input_tokens == 100 and read["service_tier"] == "default"
    observer = SSEObserver("responses")
    observer.feed(framed(events))
    assert observer.finish().error_code == "server_error"


def test_an_error_event_alone_ends_the_response_failed() -> None:
    created, delta, _, _ = responses_events()
    observer = SSEObserver("responses")
    observer.feed(framed([created, delta, error_event(True)]))
    obs = observer.finish()
    assert (obs.status, obs.terminal, obs.error_type, obs.error_code, obs.usage, obs.unmetered) == ("failed", True, "server_error", "server_error", None, None)


def test_events_without_names_whose_type_comes_last_are_read() -> None:
    """A stream of `data:` lines only, its events' keys sorted (as a server that decodes
    and re-encodes them may write them: `type` last, after a large `response`): the
    type was looked for only near the start, so the terminal event went unread."""
    events = [(None, data) for _, data in responses_events()]
    expected = reading("responses", [framed(events)])
    assert expected["usage"] is not None and expected["first_token"]
    body = b"".join(b"data: " + json.dumps(data, sort_keys=True).encode() + b"\n\n" for _, data in events)
    assert body.find(b'"type"') > 96
    for pieces in every_cut(body):
        assert reading("responses", pieces) == expected, [len(p) for p in pieces]
    body_done = body + b"data: [DONE]\n\n"  # as some gateways end a Responses stream
    assert reading("responses", [body_done]) == expected


def test_an_unnamed_event_past_the_limit_whose_type_comes_last_is_read() -> None:
    """Past `max_bytes` an event is read from its ends: its type from its tail when its
    keys are sorted (`type` last, after the large `response`)."""
    events = [(None, data) for _, data in responses_events()]
    final = events[-1][1]
    big = {**final, "response": {**final["response"], "instructions": "x" * 50_000}}
    body = b"".join(b"data: " + json.dumps(data, sort_keys=True).encode() + b"\n\n" for data in [e[1] for e in events[:-1]] + [big])
    observer = SSEObserver("responses", max_bytes=4096)
    for i in range(0, len(body), 1000):
        observer.feed(body[i : i + 1000])
    obs = observer.finish()
    assert obs.usage is not None and obs.usage.input_tokens == 100 and obs.service_tier == "priority" and obs.unmetered is None
