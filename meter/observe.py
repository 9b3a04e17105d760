"""Reading usage out of the bytes that pass through, without touching them.

Everything here is pure: the proxy hands over copies of request and response
bytes, and gets back an `Observation` (model, response id, served tier, usage,
error, time of the first output token).  Streams are read incrementally: SSE
events may be split at any byte, use `\\n` or `\\r\\n`, and carry comments.  Only
events that carry identity or usage are JSON-decoded; output deltas are
recognised by their event name and skipped, which keeps per-chunk work small.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:  # orjson is several times faster on large terminal events; json is the fallback
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _dumps: Callable[[Any], bytes] = orjson.dumps
    _DecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - exercised only without orjson
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    _DecodeError = (ValueError, UnicodeDecodeError)


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    web_search_calls: int | None = None
    cache_status: str | None = None
    cache_missed_tokens: int | None = None


@dataclass(slots=True)
class Observation:
    model: str | None = None
    response_id: str | None = None
    previous_response_id: str | None = None
    status: str | None = None  # the response's own status: completed, incomplete, failed, queued, ...
    background: bool | None = None  # the response object's own `background` flag
    service_tier: str | None = None
    usage: Usage | None = None
    error_type: str | None = None
    error_code: str | None = None
    first_token_at: float | None = None  # clock() reading at the first output delta
    terminal: bool = False  # a terminal event (or whole JSON body) was read
    unreadable: str | None = None  # why (part of) the body could not be read


@dataclass(slots=True)
class RequestFacts:
    model: str | None = None
    stream: bool = False
    background: bool = False
    service_tier: str | None = None
    user_id: str | None = None
    prompt_cache_key: str | None = None
    previous_response_id: str | None = None
    tags: str | None = None  # metadata as JSON text
    generate: bool = True


# --- small readers -----------------------------------------------------------


def _int(value: Any) -> int | None:
    # bool is an int subclass; a token count of `true` is not a count.
    return value if type(value) is int else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def request_facts(body: bytes) -> RequestFacts:
    """What meter records from a request body; anything unreadable is left unknown."""
    if not body:
        return RequestFacts()
    try:
        obj = _loads(body)
    except _DecodeError:
        return RequestFacts()
    if not isinstance(obj, dict):
        return RequestFacts()
    return facts_from_request(obj)


def facts_from_request(obj: dict[str, Any]) -> RequestFacts:
    """`request_facts` of a request already decoded (a WebSocket `response.create`)."""
    facts = RequestFacts()
    facts.model = _str(obj.get("model"))
    facts.stream = obj.get("stream") is True
    facts.background = obj.get("background") is True
    facts.service_tier = _str(obj.get("service_tier"))
    facts.user_id = _str(obj.get("safety_identifier")) or _str(obj.get("user"))
    facts.prompt_cache_key = _str(obj.get("prompt_cache_key"))
    facts.previous_response_id = _str(obj.get("previous_response_id"))
    facts.generate = obj.get("generate") is not False
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and metadata:
        facts.tags = tags_json(metadata)
    return facts


def tags_json(metadata: dict[str, Any]) -> str:
    """The request's `metadata` as compact JSON, non-ASCII kept as is."""
    try:
        return _dumps(metadata).decode()
    except (TypeError, ValueError):  # what orjson will not write (integers past 64 bits, ...)
        return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)


def usage_from_responses(usage: dict[str, Any]) -> Usage:
    """Normalise a Responses API `usage` block (SPEC §3)."""
    details_in = _dict(usage.get("input_tokens_details"))
    details_out = _dict(usage.get("output_tokens_details"))
    return Usage(
        input_tokens=_int(usage.get("input_tokens")),
        cached_tokens=_int(details_in.get("cached_tokens")),
        cache_write_tokens=_int(details_in.get("cache_write_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        reasoning_tokens=_int(details_out.get("reasoning_tokens")),
        total_tokens=_int(usage.get("total_tokens")),
    )


def usage_from_chat(usage: dict[str, Any]) -> Usage:
    """Normalise a Chat Completions or Embeddings `usage` block (SPEC §3)."""
    details_in = _dict(usage.get("prompt_tokens_details"))
    details_out = _dict(usage.get("completion_tokens_details"))
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens")),
        cached_tokens=_int(details_in.get("cached_tokens")),
        cache_write_tokens=_int(details_in.get("cache_write_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        reasoning_tokens=_int(details_out.get("reasoning_tokens")),
        total_tokens=_int(usage.get("total_tokens")),
    )


def cache_status_from_diagnostics(diagnostics: dict[str, Any]) -> tuple[str | None, int | None]:
    kind = diagnostics.get("type")
    if kind == "cache_hit":
        return "hit", None
    if kind == "cache_miss":
        return f"miss:{diagnostics.get('reason') or 'unknown'}", _int(diagnostics.get("cache_missed_tokens"))
    if isinstance(kind, str):
        return kind, None
    return None, None


def usage_anomalies(usage: Usage, has_output: bool = True) -> tuple[str, ...]:
    """Invariants of SPEC §3; a violation is reported, never corrected."""
    found: list[str] = []
    u = usage
    for value in (u.input_tokens, u.cached_tokens, u.cache_write_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens):
        if value is not None and value < 0:
            found.append("negative_count")
            break
    if u.total_tokens is not None and u.input_tokens is not None:
        expected = u.input_tokens + (u.output_tokens or 0)
        if (u.output_tokens is not None or not has_output) and u.total_tokens != expected:
            found.append("total_mismatch")
    if u.input_tokens is not None and (u.cached_tokens or 0) + (u.cache_write_tokens or 0) > u.input_tokens:
        found.append("cache_exceeds_input")
    if u.output_tokens is not None and u.reasoning_tokens is not None and u.reasoning_tokens > u.output_tokens:
        found.append("reasoning_exceeds_output")
    return tuple(found)


def observe_error(obs: Observation, error: Any) -> None:
    if isinstance(error, dict):
        obs.error_type = _str(error.get("type")) or obs.error_type
        code = error.get("code")
        obs.error_code = str(code) if code is not None else obs.error_code


def observe_response_object(obs: Observation, response: dict[str, Any], final: bool = True) -> None:
    """Read a Responses API `response` object (a JSON body or a stream event's payload).

    `final` is False for early stream events, whose service_tier is the placeholder
    `auto` rather than the tier that served the request.
    """
    obs.response_id = _str(response.get("id")) or obs.response_id
    obs.model = _str(response.get("model")) or obs.model
    obs.previous_response_id = _str(response.get("previous_response_id")) or obs.previous_response_id
    obs.status = _str(response.get("status")) or obs.status
    background = response.get("background")
    if isinstance(background, bool):
        obs.background = background
    if not final:
        return
    obs.service_tier = _str(response.get("service_tier")) or obs.service_tier
    observe_error(obs, response.get("error"))
    usage = response.get("usage")
    if isinstance(usage, dict):
        u = usage_from_responses(usage)
        web_search = _dict(_dict(response.get("tool_usage")).get("web_search"))
        u.web_search_calls = _int(web_search.get("num_requests"))
        u.cache_status, u.cache_missed_tokens = cache_status_from_diagnostics(_dict(response.get("prompt_cache_diagnostics")))
        obs.usage = u


def observe_chat_object(obs: Observation, obj: dict[str, Any]) -> None:
    """Read a Chat Completions / Embeddings body or stream chunk."""
    obs.response_id = _str(obj.get("id")) or obs.response_id
    obs.model = _str(obj.get("model")) or obs.model
    obs.service_tier = _str(obj.get("service_tier")) or obs.service_tier
    usage = obj.get("usage")
    if isinstance(usage, dict):
        obs.usage = usage_from_chat(usage)


def observe_json_body(kind: str, body: bytes) -> Observation:
    """Observe a complete (non-stream) JSON answer. `kind` is `responses` or `chat`."""
    obs = Observation()
    if not body:
        return obs
    try:
        obj = _loads(body)
    except _DecodeError as exc:
        obs.unreadable = f"invalid JSON: {str(exc)[:120]}"
        return obs
    if not isinstance(obj, dict):
        obs.unreadable = "JSON body is not an object"
        return obs
    obs.terminal = True
    if "error" in obj and isinstance(obj["error"], dict) and "object" not in obj:
        observe_error(obs, obj["error"])
        return obs
    if kind == "responses":
        observe_response_object(obs, obj)
    else:
        observe_chat_object(obs, obj)
    return obs


# --- SSE ---------------------------------------------------------------------

_RESPONSE_EVENTS_FINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed", b"response.cancelled"})
_RESPONSE_EVENTS_EARLY = frozenset({b"response.created", b"response.queued", b"response.in_progress"})
_ERROR_EVENT = b"error"


def _holds_usage_object(payload: bytes) -> bool:
    """Whether a Chat Completions chunk has `"usage": {...}` rather than `"usage": null`."""
    i = payload.rfind(b'"usage"')
    if i < 0:
        return False
    j = i + 7
    n = len(payload)
    while j < n and payload[j] in b" \t\r\n:":
        j += 1
    return payload[j : j + 1] == b"{"


class SSEObserver:
    """Incremental observer of a Server-Sent Events body.

    `feed` takes each chunk as relayed; `finish` returns the observation.  A
    chunk is scanned for line ends once; a data line is kept only while the
    event it belongs to may matter, and decoded only when it does.
    """

    __slots__ = ("kind", "obs", "_clock", "_tail", "_event", "_data", "_skip", "_ttft_pending", "_done")

    def __init__(self, kind: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.kind = kind  # "responses" or "chat"
        self.obs = Observation()
        self._clock = clock
        self._tail = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._skip = False
        self._ttft_pending = True
        self._done = False  # after the terminal event nothing more is needed

    def feed(self, chunk: bytes) -> None:
        if self._done:
            return
        if not self._tail and self._event is None and not self._data:
            # Between events, as usual: walk the chunk's whole events and judge each by
            # its name (or, for Chat Completions, whether it holds a usage object) with
            # a few byte operations.  Only an event that matters goes through the line
            # parser, on its own; the walk then goes on.  Under load TCP coalesces a
            # stream's events into large chunks, and the deltas after `response.created`
            # in the same chunk must not all fall to the line parser.
            pos, n = 0, len(chunk)
            find = chunk.find
            while pos < n:
                end = find(b"\n\n", pos)
                if end < 0:
                    break
                if not self._skip_whole_event(chunk, pos, end):
                    self._parse_lines(chunk[pos : end + 2])  # one whole event: nothing stays pending
                    if self._done:
                        return
                pos = end + 2
            if pos >= n:
                return
            if pos:
                chunk = chunk[pos:]
        self._parse_lines(chunk)

    def _parse_lines(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        pos = 0
        find = data.find
        while True:
            nl = find(b"\n", pos)
            if nl < 0:
                break
            end = nl - 1 if nl > pos and data[nl - 1] == 13 else nl
            if end == pos:
                self._dispatch()
            elif not self._skip:
                if data.startswith(b"data:", pos):
                    start = pos + 6 if data[pos + 5 : pos + 6] == b" " else pos + 5
                    self._data.append(data[start:end])
                elif data.startswith(b"event:", pos):
                    start = pos + 7 if data[pos + 6 : pos + 7] == b" " else pos + 6
                    self._on_event_name(data[start:end])
            pos = nl + 1
        self._tail = data[pos:] if pos < len(data) else b""
        if len(self._tail) > 16 << 20:  # a "line" this long is not SSE; stop holding it
            self.obs.unreadable = "SSE line longer than 16 MiB"
            self._tail = b""
            self._done = True

    def _first_token(self) -> None:
        if self._ttft_pending:
            self._ttft_pending = False
            self.obs.first_token_at = self._clock()

    def _skip_whole_event(self, chunk: bytes, start: int, end: int) -> bool:
        """Whether the event at chunk[start:end] (its blank line excluded) carries nothing we read."""
        if chunk.startswith(b"event: ", start):
            eol = chunk.find(b"\n", start + 7, end)
            if eol < 0:
                eol = end
            if chunk[eol - 1] == 13:  # CRLF lines ended by a bare LF blank line
                eol -= 1
            name = chunk[start + 7 : eol]
            if name.endswith(b".delta"):
                self._first_token()
                return True
            return self.kind == "responses" and name not in _RESPONSE_EVENTS_FINAL and name not in _RESPONSE_EVENTS_EARLY and name != _ERROR_EVENT
        if chunk.startswith(b":", start):
            return chunk.find(b"\n", start, end) < 0  # a lone comment line (keep-alive)
        if self.kind == "chat" and not self._ttft_pending and self.obs.model is not None and chunk.startswith(b"data: {", start):
            return not _holds_usage_object(chunk[start:end])
        return False

    def _on_event_name(self, name: bytes) -> None:
        self._event = name
        if name.endswith(b".delta"):
            self._first_token()
            self._skip = True  # deltas carry no usage
        elif self.kind == "responses" and name not in _RESPONSE_EVENTS_FINAL and name not in _RESPONSE_EVENTS_EARLY and name != _ERROR_EVENT:
            self._skip = True

    def _dispatch(self) -> None:
        event, lines = self._event, self._data
        self._event = None
        self._skip = False
        if not lines:
            return
        self._data = []
        payload = lines[0] if len(lines) == 1 else b"\n".join(lines)
        if self.kind == "chat":
            self._chat_payload(payload)
        else:
            self._responses_payload(event, payload)

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        try:
            obj = _loads(payload)
        except _DecodeError:
            self.obs.unreadable = "invalid JSON in an SSE event"
            return None
        return obj if isinstance(obj, dict) else None

    def _responses_payload(self, event: bytes | None, payload: bytes) -> None:
        if event is None:
            # No `event:` line: peek at the type near the start before decoding.
            head = payload[:96]
            if b".delta" in head:
                self._first_token()
                return
            if b'"response.' not in head and b'"error"' not in head:
                return
        obj = self._decode(payload)
        if obj is None:
            return
        kind = obj.get("type")
        response = obj.get("response")
        if kind in ("response.completed", "response.incomplete", "response.failed", "response.cancelled"):
            if isinstance(response, dict):
                observe_response_object(self.obs, response, final=True)
            self.obs.terminal = True
            self._done = True
        elif kind == "error":
            observe_error(self.obs, obj.get("error") if isinstance(obj.get("error"), dict) else obj)
            self.obs.status = "failed"
            self.obs.terminal = True
            self._done = True
        elif isinstance(response, dict):
            observe_response_object(self.obs, response, final=False)

    def _chat_payload(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.obs.terminal = True
            self._done = True
            return
        if not self._ttft_pending and self.obs.model is not None and not _holds_usage_object(payload):
            return  # after the first token only the usage chunk (and the tier on it) matters
        obj = self._decode(payload)
        if obj is None:
            return
        if "error" in obj and isinstance(obj["error"], dict):
            observe_error(self.obs, obj["error"])
            return
        observe_chat_object(self.obs, obj)
        if self._ttft_pending:
            for choice in obj.get("choices") or ():
                delta = _dict(choice).get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("refusal")):
                    self._first_token()
                    break

    def finish(self) -> Observation:
        if self._tail and not self._done:
            # A stream may end without the final blank line; the spec says such an
            # event is dropped, but its data is all we have of the terminal event.
            self.feed(b"\n\n")
        elif self._data and not self._done:
            self._dispatch()
        return self.obs


# --- bodies that are not streamed -------------------------------------------


class BodyCollector:
    """Keeps a bounded copy of a non-stream body, to be decoded once it ends."""

    __slots__ = ("kind", "_parts", "_size", "_limit", "overflow")

    def __init__(self, kind: str, limit: int = 64 << 20) -> None:
        self.kind = kind
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.overflow = False

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self.overflow = True
            self._parts = []
            return
        self._parts.append(chunk)

    def body(self) -> bytes:
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)

    def finish(self) -> Observation:
        if self.overflow:
            return Observation(unreadable=f"body larger than {self._limit} bytes was not metered")
        return observe_json_body(self.kind, self.body())


class Decompressing:
    """Wraps an observer so it sees the decoded form of a compressed body.

    Only meter's copy is decoded; the client still receives the upstream's bytes.
    """

    __slots__ = ("inner", "_decoder", "_failed")

    def __init__(self, inner: SSEObserver | BodyCollector, encoding: str) -> None:
        self.inner = inner
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
        self._decoder = zlib.decompressobj(wbits)
        self._failed = False

    def feed(self, chunk: bytes) -> None:
        if self._failed:
            return
        try:
            self.inner.feed(self._decoder.decompress(chunk))
        except zlib.error:
            self._failed = True

    def finish(self) -> Observation:
        obs = self.inner.finish()
        if self._failed:
            obs.unreadable = "compressed body could not be decoded"
        return obs


SUPPORTED_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def observer_for(kind: str, content_type: str, content_encoding: str, clock: Callable[[], float] = time.perf_counter) -> SSEObserver | BodyCollector | Decompressing | None:
    """The observer for an answer, or None when there is nothing to meter in it.

    `kind` is `responses` or `chat` (Chat Completions and Embeddings share a shape).
    """
    if "text/event-stream" in content_type:
        inner: SSEObserver | BodyCollector = SSEObserver(kind, clock)
    elif "json" in content_type or not content_type:
        inner = BodyCollector(kind)
    else:
        return None
    encoding = content_encoding.strip().lower()
    if not encoding or encoding == "identity":
        return inner
    if encoding in SUPPORTED_ENCODINGS:
        return Decompressing(inner, encoding)
    return _Unreadable(f"content-encoding {encoding!r} is not decoded for metering")


class _Unreadable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> Observation:
        return Observation(unreadable=self.reason)


# --- what a request is ---------------------------------------------------------

METERED_KIND = {
    "responses": "responses",
    "responses.retrieve": "responses",
    "responses.compact": "responses",
    "responses.cancel": "responses",
    "responses.delete": "responses",
    "chat.completions": "chat",
    "embeddings": "chat",
}


def endpoint_for(method: str, path: str) -> str:
    """Classify a request by its path's tail, so prefixed layouts (Azure, gateways) match."""
    segments = [s for s in path.split("?", 1)[0].split("/") if s]
    if not segments:
        return "other"
    if segments[-1] == "embeddings":
        return "embeddings"
    if segments[-2:] == ["chat", "completions"]:
        return "chat.completions"
    n = len(segments)
    for i in range(n - 1, max(n - 4, -1), -1):
        if segments[i] == "responses":
            rest = segments[i + 1 :]
            if not rest:
                return "responses"
            if rest == ["compact"]:
                return "responses.compact"
            if rest == ["input_tokens"]:
                return "responses.input_tokens"
            if len(rest) == 1:
                return {"GET": "responses.retrieve", "DELETE": "responses.delete"}.get(method, "other")
            if len(rest) == 2 and rest[1] == "cancel":
                return "responses.cancel"
            return "other"
    return "other"
