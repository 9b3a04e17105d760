"""Reading usage out of answers in the framings and shapes SSE and the APIs allow.

The SSE standard (WHATWG HTML, "Server-sent events") ends a line with CRLF, LF
or a lone CR, and drops one U+FEFF byte order mark at the start of a stream.
Each test feeds the same events in another framing or cut, and expects what
the usual LF framing reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest

from meter.observe import Observation, SSEObserver

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
