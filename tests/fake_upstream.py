"""A fake of the OpenAI provider, run as a real HTTP server, that meter's tests point meter at.

It answers the way the real API does (Responses API as JSON, SSE and WebSocket,
background mode with retrieve / resumed streams / cancel / delete, compact,
input_tokens, Chat Completions with and without streams, Embeddings, models),
replays recorded real traffic from `tests/fixtures` byte for byte, and
misbehaves on request (resets, stalls, truncated or undecodable bodies, streams
without an end, 10 MB bodies, gzip, br, zstd, any error status).  Every answer is
deterministic given the request, apart from minted ids (`resp_`/`msg_` + 32 hex
digits) and `x-request-id`, so that a call made through meter and the same call
made directly can be compared.  Tests steer it with request headers (on
WebSocket, the handshake's headers and per-response `metadata`):

    x-fake-fixture: <file>#<i>     replay interaction i of tests/fixtures/openai/<file>
    x-fake-usage: {json}           usage to report: input_tokens, cached_tokens, cache_write_tokens,
                                   output_tokens, reasoning_tokens, total_tokens (default input+output),
                                   web_search_calls (-> tool_usage.web_search.num_requests); `null`: no usage
    x-fake-cache-diagnostics: {json}  `prompt_cache_diagnostics` of the final response
    x-fake-deltas: N               output_text deltas (default 5)
    x-fake-chunk-delay-ms: MS      pause between stream chunks / WebSocket events
    x-fake-chunk-bytes: N          re-cut a stream into N-byte chunks (default: one SSE event per chunk)
    x-fake-terminal: incomplete|failed   end with response.incomplete / response.failed
    x-fake-polls: N                background: retrievals that still say in_progress (default 1)
    x-fake-cancel-usage: 1         a cancelled response keeps its usage
    x-fake-delay-ms: MS            pause before the status line
    x-fake-stall-s: S              length of the `stall*` scenarios (default 3600)
    x-fake-error: {json}           fields of the error body of `status:<code>`
    x-fake-ws-refuse: <status>     refuse a WebSocket upgrade with that status and an error body
    x-fake-encoding: gzip|deflate|br|zstd|accept
                                   compress the answer with that content coding (a stream chunk by chunk,
                                   flushed after each); `accept`: the first of them that the request's
                                   Accept-Encoding lists, in its order (Codex asks for `zstd,gzip`);
                                   identity when it lists none
    x-fake-scenario: reset-mid-stream | stall | stall-before-headers | truncated-json | non-utf8 |
                     no-terminal | big-body | gzip | slow-stream | status:<code>

On a WebSocket, `metadata.fake_action` also asks for `error` (an error event instead
of the response), `drop`/`close` (hang up after two deltas) or `stall-terminal` (the
output and its `.done` events, then no terminal event).

Control routes: `GET /__fake/health`; `GET /__fake/requests` lists the last 10,000
HTTP requests ({method, path_qs, headers: [[name, value], ...] as received,
body_b64}), `DELETE` clears them; `GET /__fake/ws` lists WebSocket handshakes
({path_qs, headers, refused, status, subprotocol, opened_at, closed_at,
close_code, messages}; times in epoch seconds), `DELETE` clears them.

Run it with `python -m tests.fake_upstream [--host H] [--port P]`: it prints
`READY http://H:<port>` once listening.  `start_fake()` runs it in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import struct
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "openai"
KEEP = 10_000  # recorded requests, WebSocket log entries and remembered responses
CREATED_AT = 1_780_000_000  # fixed, so that two identical calls give identical answers
OPENAI_VERSION = "2020-10-01"
BIG_BODY_BYTES = 10 * 1024 * 1024 + 4096  # the big-body answer's text alone is past 10 MiB
STREAM_SCENARIOS = frozenset({"reset-mid-stream", "no-terminal"})  # answered as a stream whatever was asked
RESET_AFTER_CHUNKS = 4  # reset-mid-stream: chunks sent before the connection is aborted
WORDS = ("Hello", ",", " this", " is", " a", " fake", " answer", " from", " the", " upstream", ".")
SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
}
TERMINAL_EVENT = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}
INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library "
    "correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble "
    "figuring out how to fix this, please contact us through our help center at help.openai.com.)"
)
# status -> (type, code, message) of the error body, as the real API words them
ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-...fake. You can find your API key at https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", None, "Not found."),
    409: ("invalid_request_error", "conflict", "The request conflicts with the state of the resource."),
    429: (
        "tokens",
        "rate_limit_exceeded",
        (
            "Rate limit reached for gpt-4o in organization org-fake on tokens per min (TPM): Limit 30000, Used 30000, "
            "Requested 100. Please try again in 200ms. Visit https://platform.openai.com/account/rate-limits to learn more."
        ),
    ),
    500: ("server_error", "server_error", "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded, please try again later."),
}
# Settings a response echoes from its request, with the API's defaults.
RESPONSE_SETTINGS: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "prompt_cache_retention": None,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": None,
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
    "metadata": {},
}
MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
)


class FakeInputError(ValueError):
    """A test sent the fake a control header it cannot read."""


class BadRequest(Exception):
    """The request is one the real API answers with a 400."""


# --- small helpers -------------------------------------------------------------------


def to_json(obj: Any, indent: bool = False) -> bytes:
    """Compact JSON (SSE data, WebSocket events) or indented JSON (whole bodies, like the API)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else 0)
    except TypeError:  # integers past 64 bits echoed from a request
        return json.dumps(obj, indent=2 if indent else None, separators=None if indent else (",", ":")).encode()


def from_json(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # big integers, lone surrogates: still JSON


def new_hex() -> str:
    return os.urandom(16).hex()


def resolve_model(name: Any) -> str:
    """The model that answers: aliases resolve to a dated snapshot, like the real API."""
    if not isinstance(name, str) or not name:
        return SNAPSHOTS["gpt-4o"]
    return SNAPSHOTS.get(name, name)


def served_tier(asked: Any) -> str:
    """The tier a response reports having been served on, for the tier asked."""
    if asked in (None, "auto", "default"):
        return "default"
    if asked == "fast":
        return "priority"
    return str(asked)


def delta_words(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(max(0, count))]


def header_json(headers: Mapping[str, str], name: str) -> Any:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return from_json(raw)
    except ValueError as exc:
        raise FakeInputError(f"{name} is not JSON: {raw!r}") from exc


def header_int(headers: Mapping[str, str], name: str, default: int) -> int:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise FakeInputError(f"{name} is not an integer: {raw!r}") from exc


def header_seconds(headers: Mapping[str, str], name: str, default: float, scale: float = 1.0) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        return float(raw) * scale
    except ValueError as exc:
        raise FakeInputError(f"{name} is not a number: {raw!r}") from exc


def decoded_headers(raw_headers: Iterable[tuple[bytes, bytes]]) -> list[list[str]]:
    """Header lines as received (latin-1 keeps every byte)."""
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw_headers]


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def split_sse_events(body: bytes) -> list[bytes]:
    """Cut an SSE body after each blank line; the pieces join back to the same bytes."""
    chunks, start = [], 0
    for m in _EVENT_END.finditer(body):
        chunks.append(body[start : m.end()])
        start = m.end()
    if start < len(body):
        chunks.append(body[start:])
    return chunks


def cut_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def sse_event(kind: str, fields: Mapping[str, Any], seq: int) -> bytes:
    payload = {"type": kind, **fields, "sequence_number": seq}
    return b"event: " + kind.encode() + b"\ndata: " + to_json(payload) + b"\n\n"


def error_object(status: int, message: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    kind, code, default_message = ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Error {status}.")
    )
    error = {"message": message or default_message, "type": kind, "param": None, "code": code}
    error.update(overrides or {})
    return {"error": error}


# --- usage ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One usage block, rendered in each endpoint's shape."""

    input_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    web_search_calls: int | None = None

    @classmethod
    def derive(cls, seed: int, forced: Mapping[str, Any] | None = None) -> Usage:
        """Forced values win; the rest follow from `seed` (the request's size), so they vary but repeat."""
        if forced is None:
            inp, out = 10 + seed % 97, 5 + seed % 13
            cached = inp // 2 if seed % 3 == 0 else 0
            reasoning = seed % 5 if seed % 2 else 0
            return cls(inp, cached, 0, out, reasoning, inp + out)
        try:
            inp = int(forced.get("input_tokens", 10 + seed % 97))
            out = int(forced.get("output_tokens", 5 + seed % 13))
            searches = forced.get("web_search_calls")
            return cls(
                input_tokens=inp,
                cached_tokens=int(forced.get("cached_tokens", 0)),
                cache_write_tokens=int(forced.get("cache_write_tokens", 0)),
                output_tokens=out,
                reasoning_tokens=int(forced.get("reasoning_tokens", 0)),
                total_tokens=int(forced.get("total_tokens", inp + out)),
                web_search_calls=None if searches is None else int(searches),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise FakeInputError(f"forced usage is not a usage object: {forced!r}") from exc

    def cut_to(self, output_tokens: int) -> Usage:
        """The usage of a response stopped early, after `output_tokens` tokens."""
        out = min(self.output_tokens, output_tokens)
        return replace(self, output_tokens=out, reasoning_tokens=min(self.reasoning_tokens, out), total_tokens=self.input_tokens + out)

    def responses(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": self.cache_write_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }

    def chat(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens,
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def embeddings(self) -> dict[str, Any]:
        return {"prompt_tokens": self.input_tokens, "total_tokens": self.total_tokens}


Forced = tuple[bool, Mapping[str, Any] | None]  # (a usage was forced, its values; None: report no usage)
NOT_FORCED: Forced = (False, None)


def forced_usage(value: Any) -> Forced:
    """What an `x-fake-usage` header or a `metadata.fake_usage` value forces."""
    if isinstance(value, str):
        try:
            value = from_json(value)
        except ValueError as exc:
            raise FakeInputError(f"fake usage is not JSON: {value!r}") from exc
    if value is None or isinstance(value, Mapping):
        return True, value
    raise FakeInputError(f"fake usage is not an object: {value!r}")


def header_forced(headers: Mapping[str, str]) -> Forced:
    return forced_usage(headers["x-fake-usage"]) if "x-fake-usage" in headers else NOT_FORCED


def resolve_usage(seed: int, forced: Forced, base: Mapping[str, Any] | None = None) -> Usage | None:
    """The usage to report: derived from `seed` unless forced; `base` fills what a forced usage leaves out."""
    given, values = forced
    if given and values is None:
        return None
    if not given and base is None:
        return Usage.derive(seed)
    return Usage.derive(seed, {**(base or {}), **(values or {})})


# --- Responses API objects --------------------------------------------------------------


@dataclass
class PlannedResponse:
    """One synthetic Responses API response: ids, echoed settings, text, usage, and where it stands."""

    id: str
    msg_id: str
    model: str
    tier: str
    settings: dict[str, Any]  # echoed request settings (RESPONSE_SETTINGS keys)
    source: dict[str, Any]  # the request minus its input, to plan a successor from
    usage: Usage | None
    words: list[str]
    terminal: str = "completed"  # completed | incomplete | failed
    incomplete_reason: str = "max_output_tokens"
    cache_diagnostics: Any = None
    generate: bool = True
    background: bool = False
    polls_left: int = 0
    cancelled: bool = False
    forced: Forced = NOT_FORCED

    # views of the response object

    def view(self, status: str) -> dict[str, Any]:
        """The response object as the API shows it at `status`."""
        finished = status in TERMINAL_EVENT
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": CREATED_AT,
            "status": status,
            "background": self.background,
            "completed_at": CREATED_AT + 1 if status == "completed" else None,
            "error": {"code": "server_error", "message": "The model failed to produce a response."} if status == "failed" else None,
            "frequency_penalty": 0.0,
            "incomplete_details": {"reason": self.incomplete_reason} if status == "incomplete" else None,
            "model": self.model,
            "output": self.output(status) if finished else [],
            "presence_penalty": 0.0,
            **self.settings,
            "service_tier": self.tier if finished else "auto",
            "usage": self.usage.responses() if finished and self.usage is not None else None,
        }
        if finished and self.usage is not None and self.usage.web_search_calls is not None:
            obj["tool_usage"] = {"web_search": {"num_requests": self.usage.web_search_calls}}
        if finished and self.cache_diagnostics is not None:
            obj["prompt_cache_diagnostics"] = self.cache_diagnostics
        return obj

    def cancelled_view(self, with_usage: bool) -> dict[str, Any]:
        obj = self.view("cancelled")
        if with_usage and self.usage is not None:
            obj["usage"] = self.usage.responses()
        return obj

    def text(self) -> str:
        return "".join(self.words)

    def output_text_part(self) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": self.text()}

    def message(self, status: str) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "type": "message",
            "status": "completed" if status == "completed" else "incomplete",
            "content": [self.output_text_part()],
            "role": "assistant",
        }

    def output(self, status: str) -> list[dict[str, Any]]:
        return [self.message(status)] if self.generate else []

    # the stream of events

    def opening_events(self) -> list[tuple[str, dict[str, Any]]]:
        if self.background:
            queued = self.view("queued")
            events = [("response.created", {"response": queued}), ("response.queued", {"response": queued})]
        else:
            events = [("response.created", {"response": self.view("in_progress")})]
        if not self.generate:
            return events
        events.append(("response.in_progress", {"response": self.view("in_progress")}))
        events.append(
            (
                "response.output_item.added",
                {
                    "item": {"id": self.msg_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"},
                    "output_index": 0,
                },
            )
        )
        events.append(
            (
                "response.content_part.added",
                {
                    "content_index": 0,
                    "item_id": self.msg_id,
                    "output_index": 0,
                    "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
                },
            )
        )
        return events

    def delta_event(self, index: int) -> tuple[str, dict[str, Any]]:
        return "response.output_text.delta", {
            "content_index": 0,
            "delta": self.words[index],
            "item_id": self.msg_id,
            "logprobs": [],
            "output_index": 0,
        }

    def closing_events(self) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self.generate:
            ids = {"content_index": 0, "item_id": self.msg_id, "output_index": 0}
            events.append(("response.output_text.done", {**ids, "logprobs": [], "text": self.text()}))
            events.append(("response.content_part.done", {**ids, "part": self.output_text_part()}))
            events.append(("response.output_item.done", {"item": self.message(self.terminal), "output_index": 0}))
        events.append((TERMINAL_EVENT[self.terminal], {"response": self.view(self.terminal)}))
        return events

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return self.opening_events() + [self.delta_event(i) for i in range(len(self.words))] + self.closing_events()

    def sse_chunks(self, starting_after: int = -1) -> list[bytes]:
        return [sse_event(kind, fields, seq) for seq, (kind, fields) in enumerate(self.events()) if seq > starting_after]

    def stop_for_steering(self, words_sent: int) -> None:
        """End early at a delta boundary, `incomplete` for reason `steered`."""
        self.words = self.words[:words_sent]
        self.terminal, self.incomplete_reason = "incomplete", "steered"
        if self.usage is not None:
            self.usage = self.usage.cut_to(words_sent)


# --- answers and how they are sent ---------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """An HTTP answer before delivery: a whole body, or a stream of chunks."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    chunks: list[bytes] | None = None
    terminal_chunks: int = 1  # trailing chunks that end the stream (dropped by no-terminal)


@dataclass(frozen=True)
class Delivery:
    """How to send an answer, from the request's x-fake-* headers."""

    chunk_delay: float = 0.0
    chunk_bytes: int = 0
    encoding: str | None = None  # content coding of the answer (gzip, deflate, br, zstd)
    cut: str | None = None  # "reset": abort after a few chunks; "truncate": half a body, then abort
    stall: float = 0.0  # pause after the first chunk (or after the headers of a body)
    drop_terminal: bool = False


PLAIN = Delivery()


def api_headers(content_type: str, seed: int) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "openai-version": OPENAI_VERSION,
        "openai-processing-ms": str(20 + seed % 180),
        "x-request-id": "req_" + new_hex(),
    }


def json_answer(obj: Any, seed: int = 0, status: int = 200) -> Answer:
    return Answer(status, api_headers("application/json", seed), to_json(obj, indent=True))


def sse_answer(chunks: list[bytes], seed: int = 0, terminal_chunks: int = 1) -> Answer:
    return Answer(200, api_headers("text/event-stream; charset=utf-8", seed), chunks=chunks, terminal_chunks=terminal_chunks)


def error_answer(status: int, message: str | None = None, overrides: Mapping[str, Any] | None = None) -> Answer:
    return json_answer(error_object(status, message, overrides), status=status)


def fake_error_answer(message: str) -> Answer:
    """The fake itself was misused: say so plainly."""
    return json_answer({"error": {"message": message, "type": "fake_upstream_error", "param": None, "code": None}}, status=400)


def non_utf8_answer() -> Answer:
    body = b'{\n  "id": "resp_' + b"0" * 32 + b'",\n  "object": "response",\n  "status": "completed",\n  "text": "\xff\xfe\xfa\xc3\x28"\n}'
    return Answer(200, api_headers("application/json", 0), body)


ENCODINGS = ("gzip", "deflate", "br", "zstd")


class Packer:
    """One content coding, streamed: each chunk is flushed so that a client can decode it as it arrives."""

    def __init__(self, coding: str) -> None:
        self._flush: Any = None
        if coding in ("gzip", "deflate"):  # HTTP's deflate is the zlib format
            self._coder: Any = zlib.compressobj(wbits=zlib.MAX_WBITS + (16 if coding == "gzip" else 0))
            self._flush = zlib.Z_SYNC_FLUSH
        elif coding == "br":
            import brotli

            self._coder = brotli.Compressor()
        elif coding == "zstd":
            import zstandard

            self._coder = zstandard.ZstdCompressor().compressobj()
            self._flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        else:
            raise FakeInputError(f"x-fake-encoding {coding!r}: not one of {', '.join(ENCODINGS)} or accept")
        self.coding = coding

    def pack(self, chunk: bytes) -> bytes:
        if self.coding == "br":
            return self._coder.process(chunk) + self._coder.flush()
        return self._coder.compress(chunk) + self._coder.flush(self._flush)

    def finish(self) -> bytes:
        return self._coder.finish() if self.coding == "br" else self._coder.flush()


def answer_encoding(headers: Mapping[str, str]) -> str | None:
    """The coding `x-fake-encoding` asks for; `accept` picks from the request's Accept-Encoding, in its order."""
    asked = headers.get("x-fake-encoding")
    if asked != "accept":
        return asked or None
    for item in headers.get("Accept-Encoding", "").split(","):
        name, _, params = item.partition(";")
        refused = params.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00", "q=0.000")
        if name.strip().lower() in ENCODINGS and not refused:
            return name.strip().lower()
    return None


async def deliver(request: web.BaseRequest, answer: Answer, how: Delivery) -> web.StreamResponse:
    """Send an answer whole or chunk by chunk, with the delays, compression and faults asked for."""
    if answer.chunks is None:
        return await deliver_body(request, answer, how)
    chunks = answer.chunks
    if how.drop_terminal and answer.terminal_chunks:
        chunks = chunks[: -answer.terminal_chunks]
    if how.chunk_bytes > 0:
        chunks = cut_every(b"".join(chunks), how.chunk_bytes)
    headers = dict(answer.headers)
    packer = None
    if how.encoding:
        headers["Content-Encoding"] = how.encoding
        packer = Packer(how.encoding)
    resp = web.StreamResponse(status=answer.status, headers=headers)
    await resp.prepare(request)
    for i, chunk in enumerate(chunks):
        if how.cut and i == (min(RESET_AFTER_CHUNKS, len(chunks) - 1) if how.cut == "reset" else len(chunks) // 2):
            await abort_connection(request)
            return resp
        if i == 1 and how.stall:
            await asyncio.sleep(how.stall)
        if i and how.chunk_delay:
            await asyncio.sleep(how.chunk_delay)
        if packer is not None:
            chunk = packer.pack(chunk)
        await resp.write(chunk)
    if packer is not None:
        await resp.write(packer.finish())
    await resp.write_eof()
    return resp


async def deliver_body(request: web.BaseRequest, answer: Answer, how: Delivery) -> web.StreamResponse:
    body, headers = answer.body, answer.headers
    if how.encoding:
        packer = Packer(how.encoding)
        body, headers = packer.pack(body) + packer.finish(), {**headers, "Content-Encoding": how.encoding}
    if not (how.cut or how.stall):
        return web.Response(status=answer.status, body=body, headers=headers)
    resp = web.StreamResponse(status=answer.status, headers=headers)
    resp.content_length = len(body)
    await resp.prepare(request)
    if how.stall:
        await asyncio.sleep(how.stall)
    if how.cut:  # a Content-Length the body never reaches
        await resp.write(body[: len(body) // 2])
        await abort_connection(request)
        return resp
    await resp.write(body)
    await resp.write_eof()
    return resp


async def abort_connection(request: web.BaseRequest) -> None:
    await asyncio.sleep(0.05)  # let what was written reach the peer first
    if request.transport is not None:
        request.transport.abort()


# --- the server ---------------------------------------------------------------------------


class FakeOpenAI:
    """The fake provider: HTTP routes, fixture replay, fault scenarios and the WebSocket mode."""

    def __init__(self, fixtures: Path = FIXTURES) -> None:
        self.fixtures_dir = fixtures
        self.received: deque[tuple[str, str, tuple[tuple[bytes, bytes], ...], bytes]] = deque(maxlen=KEEP)
        self.ws_log: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.responses: OrderedDict[str, PlannedResponse] = OrderedDict()
        self._fixture_files: dict[str, dict[str, Any]] = {}
        self._fixture_answers: dict[str, Answer] = {}
        self._big_text: str | None = None

    # entry point

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/__fake/"):
            return self.control(request)
        headers = request.headers
        if headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        body = await request.read()
        self.received.append((request.method, request.raw_path, request.raw_headers, body))
        try:
            delay = header_seconds(headers, "x-fake-delay-ms", 0.0, 0.001)
            if delay:
                await asyncio.sleep(delay)
            scenario = headers.get("x-fake-scenario", "")
            if scenario == "stall-before-headers":
                await asyncio.sleep(header_seconds(headers, "x-fake-stall-s", 3600.0))
            answer = self.answer(request, body, scenario)
            how = self.delivery(headers, scenario)
        except BadRequest as exc:
            answer, how = error_answer(400, str(exc)), PLAIN
        except FakeInputError as exc:
            answer, how = fake_error_answer(str(exc)), PLAIN
        return await deliver(request, answer, how)

    def answer(self, request: web.BaseRequest, body: bytes, scenario: str) -> Answer:
        fixture = request.headers.get("x-fake-fixture")
        if fixture:
            return self.fixture_answer(fixture)
        if scenario.startswith("status:"):
            return self.status_answer(request.headers, scenario)
        if scenario == "non-utf8":
            return non_utf8_answer()
        return self.route(request, body, scenario)

    @staticmethod
    def delivery(headers: Mapping[str, str], scenario: str) -> Delivery:
        delay_default = 0.1 if scenario == "slow-stream" else 0.0
        return Delivery(
            chunk_delay=header_seconds(headers, "x-fake-chunk-delay-ms", delay_default, 0.001),
            chunk_bytes=header_int(headers, "x-fake-chunk-bytes", 0),
            encoding="gzip" if scenario == "gzip" else answer_encoding(headers),
            cut="reset" if scenario == "reset-mid-stream" else "truncate" if scenario == "truncated-json" else None,
            stall=header_seconds(headers, "x-fake-stall-s", 3600.0) if scenario == "stall" else 0.0,
            drop_terminal=scenario == "no-terminal",
        )

    @staticmethod
    def status_answer(headers: Mapping[str, str], scenario: str) -> Answer:
        try:
            status = int(scenario.partition(":")[2])
        except ValueError as exc:
            raise FakeInputError(f"x-fake-scenario {scenario!r}: not status:<code>") from exc
        overrides = header_json(headers, "x-fake-error")
        if overrides is not None and not isinstance(overrides, dict):
            raise FakeInputError("x-fake-error is not a JSON object")
        return error_answer(status, overrides=overrides)

    # control routes

    def control(self, request: web.BaseRequest) -> web.Response:
        path, method = request.path, request.method
        if path == "/__fake/health":
            return web.json_response({"ok": True})
        if path == "/__fake/requests":
            if method == "DELETE":
                self.received.clear()
                return web.json_response({"cleared": True})
            listed = [
                {"method": m, "path_qs": p, "headers": decoded_headers(h), "body_b64": base64.b64encode(b).decode()}
                for m, p, h, b in self.received
            ]
            return web.Response(body=to_json(listed), content_type="application/json")
        if path == "/__fake/ws":
            if method == "DELETE":
                self.ws_log.clear()
                return web.json_response({"cleared": True})
            return web.Response(body=to_json(list(self.ws_log)), content_type="application/json")
        return web.json_response({"error": f"no fake control route {path}"}, status=404)

    # recorded answers

    def fixture_answer(self, ref: str) -> Answer:
        cached = self._fixture_answers.get(ref)
        if cached is not None:
            return cached
        name, _, index = ref.partition("#")
        try:
            interactions = self._fixture_file(name)["interactions"]
            recorded = interactions[int(index or 0)]["response"]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise FakeInputError(f"x-fake-fixture {ref!r}: no such recorded interaction ({exc})") from exc
        hop = {"content-length", "transfer-encoding", "content-encoding", "connection"}
        headers = {k: v for k, v in recorded["headers"].items() if k.lower() not in hop}
        body = recorded["body"].encode()
        if recorded["stream"]:
            answer = Answer(recorded["status"], headers, chunks=split_sse_events(body))
        else:
            answer = Answer(recorded["status"], headers, body)
        self._fixture_answers[ref] = answer
        return answer

    def _fixture_file(self, name: str) -> dict[str, Any]:
        if name not in self._fixture_files:
            if "/" in name or "\\" in name:
                raise ValueError("a fixture is named by its file name only")
            self._fixture_files[name] = json.loads((self.fixtures_dir / name).read_text())
        return self._fixture_files[name]

    # live routes

    def route(self, request: web.BaseRequest, body: bytes, scenario: str) -> Answer:
        method, parts = request.method, [p for p in request.path.split("/") if p]
        if "responses" in parts:
            at = len(parts) - 1 - parts[::-1].index("responses")
            return self.responses_route(request, method, parts[at + 1 :], body, scenario)
        if parts[-2:] == ["chat", "completions"] and method == "POST":
            return self.chat_completion(request.headers, self.request_json(body), len(body), scenario)
        if parts[-1:] == ["embeddings"] and method == "POST":
            return self.embeddings(request.headers, self.request_json(body), len(body))
        if parts[-1:] == ["models"] and method == "GET":
            return json_answer({"object": "list", "data": [model_object(m) for m in MODELS]})
        if parts[-2:-1] == ["models"] and method == "GET":
            if parts[-1] in MODELS or parts[-1] in SNAPSHOTS.values():
                return json_answer(model_object(parts[-1]))
            return error_answer(
                404, f"The model '{parts[-1]}' does not exist or you do not have access to it.", {"code": "model_not_found"}
            )
        return unknown_route(request)

    def responses_route(self, request: web.BaseRequest, method: str, rest: list[str], body: bytes, scenario: str) -> Answer:
        headers = request.headers
        if not rest and method == "POST":
            return self.create_response(headers, self.request_json(body), len(body), scenario)
        if rest == ["compact"] and method == "POST":
            return self.compact(headers, self.request_json(body), len(body))
        if rest == ["input_tokens"] and method == "POST":
            self.request_json(body)
            counted = resolve_usage(len(body), header_forced(headers)) or Usage.derive(len(body))
            return json_answer({"object": "response.input_tokens", "input_tokens": counted.input_tokens}, len(body))
        if len(rest) == 1 and method == "GET":
            return self.retrieve(rest[0], request.query)
        if len(rest) == 1 and method == "DELETE":
            self.responses.pop(rest[0], None)  # deleting twice is not an error here
            return json_answer({"id": rest[0], "object": "response.deleted", "deleted": True})
        if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
            return self.cancel(rest[0], bool(headers.get("x-fake-cancel-usage")))
        if len(rest) == 2 and rest[1] == "input_items" and method == "GET":
            if rest[0] not in self.responses:
                return response_not_found(rest[0])
            return json_answer({"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False})
        return unknown_route(request)

    @staticmethod
    def request_json(body: bytes) -> dict[str, Any]:
        """The request's JSON object; anything else is the API's 400."""
        try:
            obj = from_json(body)
        except ValueError:
            raise BadRequest(INVALID_JSON_MESSAGE) from None
        if not isinstance(obj, dict):
            raise BadRequest("Invalid type for request body: expected an object.")
        return obj

    # Responses API

    def plan_response(
        self,
        req: Mapping[str, Any],
        seed: int,
        headers: Mapping[str, str],
        forced: Forced | None = None,
        deltas: int | None = None,
        terminal: str | None = None,
        diagnostics: Any = None,
    ) -> PlannedResponse:
        """A response for a request: settings from the request, the rest from x-fake-* headers unless given."""
        forced = header_forced(headers) if forced is None else forced
        terminal = terminal or headers.get("x-fake-terminal", "completed")
        if terminal not in TERMINAL_EVENT:
            raise FakeInputError(f"x-fake-terminal {terminal!r}: not completed, incomplete or failed")
        settings = {k: default if req.get(k) is None else req[k] for k, default in RESPONSE_SETTINGS.items()}
        settings["previous_response_id"] = req.get("previous_response_id")
        plan = PlannedResponse(
            id="resp_" + new_hex(),
            msg_id="msg_" + new_hex(),
            model=resolve_model(req.get("model")),
            tier=served_tier(req.get("service_tier")),
            settings=settings,
            source={k: v for k, v in req.items() if k not in ("input", "type", "stream_id")},
            usage=resolve_usage(seed, forced),
            words=delta_words(header_int(headers, "x-fake-deltas", 5) if deltas is None else deltas),
            terminal=terminal,
            cache_diagnostics=diagnostics if diagnostics is not None else header_json(headers, "x-fake-cache-diagnostics"),
            background=bool(req.get("background")),
            forced=forced,
        )
        return plan

    def remember(self, plan: PlannedResponse) -> None:
        self.responses[plan.id] = plan
        if len(self.responses) > KEEP:
            self.responses.popitem(last=False)

    def create_response(self, headers: Mapping[str, str], req: dict[str, Any], seed: int, scenario: str) -> Answer:
        plan = self.plan_response(req, seed, headers)
        if scenario == "big-body":
            plan.words = [self.big_text()]
        self.remember(plan)
        stream = bool(req.get("stream")) or scenario in STREAM_SCENARIOS
        if plan.background:
            plan.polls_left = 0 if stream else header_int(headers, "x-fake-polls", 1)
            return sse_answer(plan.sse_chunks(), seed) if stream else json_answer(plan.view("queued"), seed)
        if stream:
            return sse_answer(plan.sse_chunks(), seed)
        return json_answer(plan.view(plan.terminal), seed)

    def big_text(self) -> str:
        if self._big_text is None:
            line = "All work and no play makes a fake upstream a big body. "
            self._big_text = (line * (BIG_BODY_BYTES // len(line) + 1))[:BIG_BODY_BYTES]
        return self._big_text

    def retrieve(self, rid: str, query: Mapping[str, str]) -> Answer:
        plan = self.responses.get(rid)
        if plan is None:
            return response_not_found(rid)
        if query.get("stream") == "true":
            try:
                after = int(query.get("starting_after", -1))
            except ValueError:
                return error_answer(400, "Invalid 'starting_after': expected an integer.", {"param": "starting_after"})
            plan.polls_left = 0
            return sse_answer(plan.sse_chunks(after))
        if plan.cancelled:
            return json_answer(plan.view("cancelled"))
        if plan.polls_left > 0:
            plan.polls_left -= 1
            return json_answer(plan.view("in_progress"))
        return json_answer(plan.view(plan.terminal))

    def cancel(self, rid: str, with_usage: bool) -> Answer:
        plan = self.responses.get(rid)
        if plan is None:
            return response_not_found(rid)
        plan.cancelled, plan.polls_left = True, 0
        return json_answer(plan.cancelled_view(with_usage))

    def compact(self, headers: Mapping[str, str], req: dict[str, Any], seed: int) -> Answer:
        usage = resolve_usage(seed, header_forced(headers))
        items = req.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        kept = [
            {
                "content": [{"text": item["content"], "type": "input_text"}],
                "id": "msg_" + new_hex(),
                "role": "user",
                "status": "completed",
                "type": "message",
            }
            for item in items or []
            if isinstance(item, dict) and item.get("role") == "user" and isinstance(item.get("content"), str)
        ]
        compaction = {
            "encrypted_content": "gAAAAA" + base64.urlsafe_b64encode(os.urandom(48)).decode(),
            "id": "cmp_" + new_hex(),
            "type": "compaction",
        }
        obj = {"created_at": CREATED_AT, "id": "resp_" + new_hex(), "object": "response.compaction", "output": [*kept, compaction]}
        obj["usage"] = usage.responses() if usage is not None else None
        return json_answer(obj, seed)

    # Chat Completions and Embeddings

    def chat_completion(self, headers: Mapping[str, str], req: dict[str, Any], seed: int, scenario: str) -> Answer:
        usage = resolve_usage(seed, header_forced(headers))
        words = delta_words(header_int(headers, "x-fake-deltas", 5))
        finish = "length" if headers.get("x-fake-terminal") == "incomplete" else "stop"
        base = {
            "id": "chatcmpl-" + new_hex()[:29],
            "object": "chat.completion",
            "created": CREATED_AT,
            "model": resolve_model(req.get("model") or "gpt-4o-mini"),
        }
        tier = served_tier(req.get("service_tier"))
        if not (req.get("stream") or scenario in STREAM_SCENARIOS):
            message = {"role": "assistant", "content": "".join(words), "refusal": None, "annotations": []}
            obj = {
                **base,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage.chat() if usage is not None else None,
                "service_tier": tier,
                "system_fingerprint": None,
            }
            return json_answer(obj, seed)
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        head = {**base, "object": "chat.completion.chunk", "service_tier": tier, "system_fingerprint": None}

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            obj: dict[str, Any] = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                obj["usage"] = None
            return b"data: " + to_json(obj) + b"\n\n"

        chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        chunks += [chunk({"content": w}, None) for w in words]
        chunks.append(chunk({}, finish))
        if include_usage:
            chunks.append(b"data: " + to_json({**head, "choices": [], "usage": usage.chat() if usage is not None else None}) + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return sse_answer(chunks, seed, terminal_chunks=2 if include_usage else 1)

    def embeddings(self, headers: Mapping[str, str], req: dict[str, Any], seed: int) -> Answer:
        usage = resolve_usage(seed, header_forced(headers), base={"input_tokens": 10 + seed % 97, "output_tokens": 0})
        inputs = req.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        dims = req.get("dimensions") if isinstance(req.get("dimensions"), int) and 0 < req["dimensions"] <= 4096 else 16
        as_base64 = req.get("encoding_format") == "base64"
        data = []
        for i in range(count):
            vector = [round(((i * 31 + k * 17 + seed) % 200) / 100 - 1.0, 6) for k in range(dims)]
            embedding: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        obj = {
            "object": "list",
            "data": data,
            "model": req.get("model") or "text-embedding-3-small",
            "usage": usage.embeddings() if usage else None,
        }
        return json_answer(obj, seed)

    # WebSocket mode

    async def websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = request.headers
        entry: dict[str, Any] = {
            "path_qs": request.raw_path,
            "headers": decoded_headers(request.raw_headers),
            "refused": False,
            "status": 101,
            "subprotocol": None,
            "opened_at": time.time(),
            "closed_at": None,
            "close_code": None,
            "messages": 0,
        }
        self.ws_log.append(entry)
        try:
            delay = header_seconds(headers, "x-fake-delay-ms", 0.0, 0.001)
            if delay:
                await asyncio.sleep(delay)
            refusal = self.websocket_refusal(request)
            if refusal is not None:
                entry.update(refused=True, status=refusal.status)
                return await deliver(request, refusal, PLAIN)
            offered = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
            ws = web.WebSocketResponse(protocols=offered, compress=False, max_msg_size=0)
            await ws.prepare(request)
            entry["subprotocol"] = ws.ws_protocol
            session = SocketSession(self, ws, request, entry)
            try:
                await session.serve()
            finally:
                entry["close_code"] = ws.close_code
            return ws
        finally:
            entry["closed_at"] = time.time()

    @staticmethod
    def websocket_refusal(request: web.BaseRequest) -> Answer | None:
        refuse = request.headers.get("x-fake-ws-refuse")
        if refuse:
            try:
                return error_answer(int(refuse))
            except ValueError:
                return fake_error_answer(f"x-fake-ws-refuse {refuse!r}: not a status code")
        if [p for p in request.path.split("/") if p][-1:] != ["responses"]:
            return unknown_route(request)
        return None


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED_AT, "owned_by": "openai" if name.startswith("o") else "system"}


def unknown_route(request: web.BaseRequest) -> Answer:
    return error_answer(404, f"Invalid URL ({request.method} {request.path})")


def response_not_found(rid: str) -> Answer:
    return error_answer(404, f"Response with id '{rid}' not found.", {"param": None})


# --- WebSocket sessions ----------------------------------------------------------------------


@dataclass
class ActiveResponse:
    """A response being streamed on a socket: its lane, its event counter, a pending steer."""

    plan: PlannedResponse
    stream_id: str | None
    seq: int = 0
    steer: tuple[str, Any] | None = None  # (steer id, input) once a response.steer was accepted
    words_sent: int = 0


@dataclass
class SocketSession:
    """One accepted WebSocket: reads client events, streams responses on lanes (FIFO per stream_id)."""

    fake: FakeOpenAI
    ws: web.WebSocketResponse
    request: web.BaseRequest
    log: dict[str, Any]
    responses: dict[str, PlannedResponse] = field(default_factory=dict)  # this socket's, for previous_response_id
    active: dict[str, ActiveResponse] = field(default_factory=dict)
    lanes: dict[str | None, asyncio.Task[None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        headers = self.request.headers
        self.default_model = self.request.query.get("model")
        self.delay = header_seconds(headers, "x-fake-chunk-delay-ms", 0.0, 0.001)

    async def serve(self) -> None:
        try:
            async for msg in self.ws:
                self.log["messages"] += 1
                if msg.type == WSMsgType.TEXT:
                    await self.on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self.send(msg.data, WSMsgType.BINARY)
        finally:
            await asyncio.sleep(0)  # a lane closing the socket finishes its close() first
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def send(self, data: bytes, kind: WSMsgType = WSMsgType.TEXT) -> None:
        async with self.send_lock:
            await self.ws.send_frame(data, kind)

    async def send_event(self, kind: str, fields: Mapping[str, Any], stream_id: str | None, seq: int | None) -> None:
        payload: dict[str, Any] = {"type": kind, **fields}
        if seq is not None:
            payload["sequence_number"] = seq
        if stream_id is not None:
            payload["stream_id"] = stream_id
        await self.send(to_json(payload))

    async def send_error(self, code: str, message: str, stream_id: str | None = None, param: str | None = None) -> None:
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
        await self.send_event("error", {"status": 400, "error": error}, stream_id, None)

    async def on_text(self, data: str) -> None:
        try:
            event = from_json(data)
        except ValueError:
            await self.send_error("invalid_json", "The message is not valid JSON.")
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "response.create":
            self.start_create(event, len(data))
        elif kind == "response.steer":
            await self.steer(event)
        else:
            await self.send_error("unknown_event_type", f"Unsupported event type: {kind!r}.", param="type")

    def start_create(self, event: dict[str, Any], seed: int) -> None:
        """Queue the response on its lane: lanes run side by side, responses on one lane one after another."""
        lane = event.get("stream_id")
        lane = lane if isinstance(lane, str) else None
        task = asyncio.create_task(self.run_on_lane(self.lanes.get(lane), event, seed))
        self.lanes[lane] = task
        self.tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if self.lanes.get(lane) is t:
                del self.lanes[lane]

        task.add_done_callback(finished)

    async def run_on_lane(self, before: asyncio.Task[None] | None, event: dict[str, Any], seed: int) -> None:
        if before is not None:
            await asyncio.wait([before])
        try:
            await self.create(event, seed)
        except (ConnectionError, RuntimeError):
            pass  # the socket went away mid-response
        except FakeInputError as exc:
            await self.send_error("fake_upstream_error", str(exc), event.get("stream_id"))

    async def create(self, event: dict[str, Any], seed: int) -> None:
        stream_id = event.get("stream_id") if isinstance(event.get("stream_id"), str) else None
        metadata = event.get("metadata") if isinstance(event.get("metadata"), dict) else {}
        action = metadata.get("fake_action")
        if action == "error":
            error = {
                "type": "invalid_request_error",
                "code": "bad_thing",
                "message": "The fake was asked to fail this request.",
                "param": None,
            }
            await self.send_event("error", {"error": error}, stream_id, None)
            return
        previous = event.get("previous_response_id")
        if previous and previous not in self.responses and previous not in self.fake.responses:
            await self.send_error(
                "previous_response_not_found", f"Previous response with id '{previous}' not found.", stream_id, "previous_response_id"
            )
            return
        req = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
        if "model" not in req and self.default_model:
            req["model"] = self.default_model
        req.pop("background", None)  # not on a socket
        headers = self.request.headers
        forced = forced_usage(metadata["fake_usage"]) if "fake_usage" in metadata else None
        generate = req.get("generate") is not False
        if not generate and forced is None:
            forced = (True, None)  # a warm-up carries no usage unless a test forces one
        deltas = header_int(metadata, "fake_deltas", -1) if "fake_deltas" in metadata else None
        plan = self.fake.plan_response(
            req,
            seed,
            headers,
            forced=forced,
            deltas=deltas if generate else 0,
            terminal=metadata.get("fake_terminal"),
            diagnostics=metadata.get("fake_cache_diagnostics"),
        )
        plan.generate = generate
        await self.stream(plan, stream_id, action)

    async def stream(self, plan: PlannedResponse, stream_id: str | None, action: Any = None) -> None:
        """Send one response's events; a steer accepted meanwhile ends it and starts its successor."""
        self.responses[plan.id] = plan
        self.fake.remember(plan)
        active = ActiveResponse(plan, stream_id)
        self.active[plan.id] = active
        hang_up_at = min(2, len(plan.words)) if action in ("drop", "close") else -1
        try:
            for kind, fields in plan.opening_events():
                await self.emit(active, kind, fields)
            for i in range(len(plan.words) + 1):
                if i == hang_up_at:
                    await self.hang_up(action)
                    return
                if i == len(plan.words):
                    break
                if active.steer is not None:
                    plan.stop_for_steering(i)
                    break
                await self.emit(active, *plan.delta_event(i))
                active.words_sent = i + 1
            closing = plan.closing_events()
            stall = action == "stall-terminal"  # the output's `.done` events, then silence: no terminal event
            for kind, fields in closing[:-1] if stall else closing:
                await self.emit(active, kind, fields)
            if stall:
                await asyncio.sleep(3600)
        finally:
            self.active.pop(plan.id, None)
        if active.steer is not None:
            await self.stream(self.successor(plan, active.steer[1]), stream_id)

    async def emit(self, active: ActiveResponse, kind: str, fields: Mapping[str, Any]) -> None:
        if active.seq and self.delay:
            await asyncio.sleep(self.delay)
        seq, active.seq = active.seq, active.seq + 1
        await self.send_event(kind, fields, active.stream_id, seq)

    async def hang_up(self, how: str) -> None:
        if how == "close":
            await self.ws.close(code=1011, message=b"fake close")
        elif self.request.transport is not None:
            self.request.transport.abort()

    def successor(self, plan: PlannedResponse, steer_input: Any) -> PlannedResponse:
        """The automatic successor of a steered response: same settings, continuing from it."""
        req = {**plan.source, "previous_response_id": plan.id, "input": steer_input}
        return self.fake.plan_response(req, len(to_json(req)), self.request.headers, forced=plan.forced, diagnostics=plan.cache_diagnostics)

    async def steer(self, event: dict[str, Any]) -> None:
        target_id = event.get("previous_response_id")
        target = self.active.get(target_id) if isinstance(target_id, str) else None
        if target is None or not target.plan.generate or target.steer is not None:
            code = "response_already_completed" if target_id in self.responses else "response_not_found"
            failure = {
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": f"Response '{target_id}' is not accepting steering input.",
                },
                "steer": {"input": event.get("input"), "previous_response_id": target_id},
            }
            await self.send_event("response.steer.failed", failure, target.stream_id if target else None, 0)
            return
        steer_id = "steer_" + new_hex()
        target.steer = (steer_id, event.get("input"))
        seq, target.seq = target.seq, target.seq + 1
        await self.send_event(
            "response.steer.accepted", {"steer": {"id": steer_id, "previous_response_id": target_id}}, target.stream_id, seq
        )


# --- running it ------------------------------------------------------------------------------


def make_server(fake: FakeOpenAI | None = None) -> web.Server:
    """An aiohttp low-level server around a fake: no access log, no body size limit, handlers cancelled on hang-up."""
    fake = fake or FakeOpenAI()
    loop = asyncio.get_running_loop()

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=0)

    return web.Server(
        fake.handle,
        request_factory=make_request,
        handler_cancellation=True,
        access_log=None,
        max_line_size=65536,
        max_field_size=65536,
    )


async def start_fake(host: str = "127.0.0.1", port: int = 0, fake: FakeOpenAI | None = None) -> tuple[web.BaseRunner, str]:
    """Run the fake in this event loop; returns its runner (`await runner.cleanup()` stops it) and base URL."""
    runner = web.ServerRunner(make_server(fake), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, f"http://{host}:{bound}"


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI provider for meter's tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def serve() -> None:
        runner, url = await start_fake(args.host, args.port)
        print(f"READY {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
