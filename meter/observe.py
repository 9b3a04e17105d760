"""Reading usage out of the bytes that pass through, without touching them.

Everything here is pure: the proxy hands over copies of request and response
bytes, and gets back an `Observation` (model, response id, served tier, usage,
error, time of the first output token).  Streams are read incrementally: SSE
events may be split at any byte, use `\\n` or `\\r\\n`, and carry comments.  Only
events that carry identity or usage are JSON-decoded; output deltas are
recognised by their event name and skipped, which keeps per-chunk work small.

What is held is bounded whatever the upstream sends: a compressed answer is
decoded in small pieces, an SSE event or a JSON body is held whole only up to
`max_bytes` (past it, a head and a tail, from which identity and usage are
still read), and each byte is scanned for line ends once.  When usage cannot be
read, `Observation.unmetered` says why, so that it is counted, not lost.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli
import zstandard

try:  # orjson is several times faster on large terminal events; json is the fallback
    import orjson

    _orjson_loads = orjson.loads

    def _loads(data: bytes | bytearray | memoryview | str) -> Any:
        try:
            return _orjson_loads(data)
        except orjson.JSONDecodeError:
            # orjson refuses lone surrogates ("\ud800" is valid JSON): a client must
            # not dodge metering with one.  The ledger makes them U+FFFD.
            try:
                return json.loads(data if not isinstance(data, memoryview) else bytes(data))
            except RecursionError:  # nested past what orjson reads, too deep for json too
                raise ValueError("JSON nested too deep") from None

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _DecodeError: tuple[type[Exception], ...] = (ValueError, UnicodeDecodeError)  # orjson's error is a ValueError
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
    # Why a model call that ended without an error has no usage meter could read:
    # metered_bytes_limit, oversized_event, unknown_encoding, no_include_usage,
    # no_terminal_event.  Counted, so that nothing goes unmetered silently.
    unmetered: str | None = None


@dataclass(slots=True)
class RequestFacts:
    model: str | None = None
    stream: bool = False
    background: bool = False
    service_tier: str | None = None
    user_id: str | None = None
    prompt_cache_key: str | None = None
    previous_response_id: str | None = None
    tags: str | None = None  # metadata as JSON text, bounded (see bounded_tags)
    generate: bool = True
    cut: tuple[str, ...] = ()  # what was cut to its bound ("tags", "request"), for meter_values_truncated_total


# --- small readers -----------------------------------------------------------


def _int(value: Any) -> int | None:
    # bool is an int subclass; a token count of `true` is not a count.
    return value if type(value) is int else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# A body with more JSON members than this is not decoded for metering: decoding
# costs the event loop ~0.65 us a member (a 50 MiB body of 3.7 M metadata keys
# stalled every request for 2.4 s).  Real requests stay far below it; the
# count is a byte search, ~1 ms a MiB, done only on bodies past a MiB.
_MAX_MEMBERS = 500_000
_COUNT_MEMBERS_PAST = 1 << 20


def request_facts(body: bytes) -> RequestFacts:
    """What meter records from a request body; anything unreadable is left unknown."""
    if not body:
        return RequestFacts()
    if len(body) > _COUNT_MEMBERS_PAST and body.count(b'":') > _MAX_MEMBERS:
        return RequestFacts(cut=("request",))
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
        tags, cut = bounded_tags(metadata)
        facts.tags = tags_json(tags)
        if cut:
            facts.cut = ("tags",)
    return facts


# OpenAI's own metadata limits (SPEC §2b): what meter keeps of a request's metadata.
TAG_PAIRS, TAG_KEY_CHARS, TAG_VALUE_CHARS = 16, 64, 512


_TOO_DEEP = "(a value nested too deep to write)"


def _json_text(value: Any) -> str:
    """A non-string metadata value as its JSON text (cut later), whatever its depth."""
    try:
        return _dumps(value).decode()
    except (TypeError, ValueError):  # past orjson's depth or integer range
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):  # even repr() recurses: say what it was
            return _TOO_DEEP


def bounded_tags(metadata: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """The first 16 pairs, keys cut to 64 characters, values to 512, every value a
    string (non-strings as their JSON text); and whether anything was cut."""
    tags: dict[str, str] = {}
    cut = len(metadata) > TAG_PAIRS
    for i, (key, value) in enumerate(metadata.items()):
        if i == TAG_PAIRS:
            break
        if len(key) > TAG_KEY_CHARS:
            key, cut = key[:TAG_KEY_CHARS], True
        if not isinstance(value, str):
            value = _json_text(value)
        if len(value) > TAG_VALUE_CHARS:
            value, cut = value[:TAG_VALUE_CHARS], True
        tags[key] = value
    return tags, cut


def tags_json(metadata: dict[str, str]) -> str:
    """Bounded tags as compact JSON, non-ASCII kept as is."""
    return _dumps(metadata).decode()


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


# --- bounded copies ------------------------------------------------------------

# Past `max_bytes` an event or body keeps this much of its start and of its end:
# enough for the members around a large `output` (id, model, status before it;
# usage, the served tier after it), small beside the limit.
_EDGE_MAX = 1 << 20


def _edge(limit: int) -> int:
    """How much of each end is kept of something past `limit`: at most half of it."""
    return max(1, min(limit // 2, _EDGE_MAX))


class MeteringBudget:
    """The bytes every answer being metered may hold whole at once (`--max-metered-bytes-total`).

    Each answer may hold up to max_bytes whole; past what is left here it is read
    from its head and tail instead, as an answer past max_bytes is, so memory is
    bounded by settings however many large answers clients ask for at once.  The
    event loop's alone: no lock.
    """

    __slots__ = ("free",)

    def __init__(self, total: int) -> None:
        self.free = total


class _Capped:
    """Bytes held whole up to `limit`; past it only a head and a tail of them.

    Whole, the first piece is held by reference (a body that comes in one chunk
    costs no copy) and later pieces go into one bytearray, so the bytes held are
    the bytes counted however small the pieces.  Past the limit the first `edge`
    bytes stay, and the last `edge` (up to twice that between trims) roll on.
    """

    __slots__ = ("limit", "edge", "size", "_first", "_buf", "head", "tail", "budget", "_held")

    def __init__(self, limit: int, budget: MeteringBudget | None = None) -> None:
        self.limit = limit
        self.budget = budget
        self._held = 0  # bytes of `budget` this copy holds
        self.size = 0
        self._first: bytes | None = None
        self._buf: bytearray | None = None
        self.tail: bytearray | None = None  # set, with `head` and `edge`, once past the limit

    def add(self, piece: bytes | memoryview) -> None:
        n = len(piece)
        size = self.size + n
        self.size = size
        tail = self.tail
        if tail is not None:
            edge = self.edge
            if n >= edge:
                tail[:] = piece[n - edge :]
            else:
                tail += piece
                if len(tail) > 2 * edge:
                    del tail[: len(tail) - edge]
        elif size <= self.limit and (self.budget is None or self._reserve(n)):
            buf = self._buf
            if buf is not None:
                buf += piece
            elif self._first is None:
                self._first = piece if type(piece) is bytes else bytes(piece)  # not a view of a larger chunk
            else:
                self._buf = bytearray(self._first)
                self._buf += piece
                self._first = None
        else:
            self._spill(piece)

    def _spill(self, piece: bytes | memoryview) -> None:
        """The limit is crossed: keep the head and the tail of what is held and `piece`."""
        held: bytes | bytearray = self._buf if self._buf is not None else (self._first or b"")
        edge = self.edge = _edge(self.limit)
        n, h = len(piece), len(held)
        self.head = bytes(held[:edge]) if h >= edge else bytes(held) + piece[: edge - h]
        if n >= edge:
            self.tail = bytearray(piece[n - edge :])
        else:
            self.tail = bytearray(held[h - (edge - n) :]) if h > edge - n else bytearray(held)
            self.tail += piece
        self._first = self._buf = None
        self.release()

    def _reserve(self, n: int) -> bool:
        budget = self.budget
        if budget.free < n:  # type: ignore[union-attr]
            return False
        budget.free -= n  # type: ignore[union-attr]
        self._held += n
        return True

    def release(self) -> None:
        """Give back what this copy holds of the budget: it is read, cut, or abandoned."""
        if self._held:
            self.budget.free += self._held  # type: ignore[union-attr]
            self._held = 0

    def whole(self) -> bytes | bytearray:
        if self._buf is not None:
            return self._buf
        return self._first or b""


# --- reading an object that was cut in the middle --------------------------------

_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')  # a JSON string, or a bracket
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_VALUE_WINDOW = 64 << 10  # members read from a head or tail are small (usage, ids)
_NOTHING: Any = object()
_raw_decode = json.JSONDecoder().raw_decode


def _value_at(buf: bytes | bytearray, pos: int) -> Any:
    """The JSON value that starts at buf[pos], if it ends within the window."""
    text = bytes(buf[pos : pos + _VALUE_WINDOW]).decode("utf-8", "replace")
    try:
        return _raw_decode(text)[0]
    except ValueError:
        return _NOTHING


def _members(buf: bytes | bytearray, start: int, wanted: frozenset[str]) -> dict[str, int]:
    """Where the values of the `wanted` members of the object opening at buf[start] begin.

    Strings are tokens, so a key is told from text that looks like one, and only
    members of the object itself (depth 1) count.  `buf` may end anywhere.
    """
    found: dict[str, int] = {}
    depth = 0
    for m in _TOKEN.finditer(buf, start):
        c = buf[m.start()]
        if c == 34:  # '"'
            if depth == 1:
                colon = _COLON.match(buf, m.end())
                if colon is not None:
                    key = bytes(buf[m.start() + 1 : m.end() - 1]).decode("utf-8", "replace")
                    if key in wanted and key not in found:
                        found[key] = colon.end()
                        if len(found) == len(wanted):
                            break
        elif c == 123 or c == 91:  # { [
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                break
    return found


def _last_member(buf: bytes | bytearray, key: str, check: Callable[[Any], bool]) -> Any:
    """The value of the last member named `key` in `buf`, a tail of a JSON text.

    A tail starts anywhere, even inside a string, so depth cannot be known; but
    inside a string every quote is escaped, so `"key"` preceded by `{` or `,`
    and followed by `:` is a member of some object.  The last one whose value
    passes `check` is taken: in OpenAI's serialisation `usage` and
    `service_tier` come after `output`, and nested values come before them.
    """
    needle = b'"' + key.encode() + b'"'
    end = len(buf)
    for _ in range(64):
        i = buf.rfind(needle, 0, end)
        if i < 0:
            break
        end = i + len(needle) - 1
        j = i - 1
        while j >= 0 and buf[j] in b" \t\r\n":
            j -= 1
        if j < 0 or buf[j] not in b"{,":
            continue
        colon = _COLON.match(buf, i + len(needle))
        if colon is None:
            continue
        value = _value_at(buf, colon.end())
        if value is not _NOTHING and check(value):
            return value
    return _NOTHING


def _is_usage(value: Any) -> bool:
    return isinstance(value, dict) and any(type(value.get(k)) is int for k in ("input_tokens", "prompt_tokens", "output_tokens", "total_tokens"))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


_RESPONSE_HEAD = frozenset({"id", "model", "status", "previous_response_id", "background", "service_tier", "error", "usage", "tool_usage", "prompt_cache_diagnostics"})
_CHAT_HEAD = frozenset({"id", "object", "model", "service_tier", "error", "usage"})
_RESPONSE_TAIL: dict[str, Callable[[Any], bool]] = {"usage": _is_usage, "service_tier": _is_str, "tool_usage": _is_dict, "prompt_cache_diagnostics": _is_dict}
_CHAT_TAIL: dict[str, Callable[[Any], bool]] = {"usage": _is_usage, "service_tier": _is_str}


def _partial_object(head: bytes, tail: bytes | bytearray, start: int, head_keys: frozenset[str], tail_keys: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    """What an object too large to hold still says: its members found whole in its
    head (exactly, by depth), and those after a large `output` found in its tail."""
    found: dict[str, Any] = {}
    for key, pos in _members(head, start, head_keys).items():
        value = _value_at(head, pos)
        if value is not _NOTHING:
            found[key] = value
    for key, check in tail_keys.items():
        if key not in found or not check(found[key]):
            value = _last_member(tail, key, check)
            if value is not _NOTHING:
                found[key] = value
    return found


def _member_start(head: bytes, key: str) -> int | None:
    """Where the value of a top-level member of the object at head[0] begins."""
    return _members(head, 0, frozenset({key})).get(key)


def _partial_response(head: bytes, tail: bytes | bytearray, start: int, kind: str) -> dict[str, Any]:
    """The `response` of an event too large to decode, opening at head[start]: the
    members before a large `output`, and for a terminal event those after it (usage,
    the served tier) from the tail."""
    if kind in _FINAL_TYPES:
        return _partial_object(head, tail, start, _RESPONSE_HEAD, _RESPONSE_TAIL)
    return _partial_object(head, b"", start, _RESPONSE_HEAD, {})


def event_from_ends(data: bytes, limit: int) -> dict[str, Any]:
    """A Responses event past `limit` (a WebSocket message), read from its ends only,
    so that metering it never builds a second, decoded copy of (say) a generated
    image: its `type`, `stream_id` and `error`, and what its `response` says there."""
    edge = _edge(limit)
    head, tail = data[:edge], data[-edge:]
    top = _members(head, 0, frozenset({"type", "stream_id", "response", "error"}))
    event: dict[str, Any] = {}
    for key in ("type", "stream_id", "error"):
        if key in top:
            value = _value_at(head, top[key])
            if value is not _NOTHING:
                event[key] = value
    if "stream_id" not in event:
        value = _last_member(tail, "stream_id", _is_str)
        if value is not _NOTHING:
            event["stream_id"] = value
    if "response" in top:
        event["response"] = _partial_response(head, tail, top["response"], event.get("type", ""))
    return event


def _observe_cut_body(kind: str, head: bytes, tail: bytes | bytearray) -> Observation:
    """Observe a JSON answer larger than max_bytes from its head and tail."""
    obs = Observation(terminal=True)
    if kind == "responses":
        found = _partial_object(head, tail, 0, _RESPONSE_HEAD, _RESPONSE_TAIL)
        if "id" not in found and isinstance(found.get("error"), dict):
            observe_error(obs, found["error"])
        else:
            observe_response_object(obs, found)
    else:
        found = _partial_object(head, tail, 0, _CHAT_HEAD, _CHAT_TAIL)
        if "id" not in found and isinstance(found.get("error"), dict):
            observe_error(obs, found["error"])
        else:
            observe_chat_object(obs, found)
    if obs.usage is None and obs.error_type is None and obs.error_code is None:
        obs.unmetered = "metered_bytes_limit"
    return obs


# --- SSE ---------------------------------------------------------------------

_RESPONSE_EVENTS_FINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed", b"response.cancelled"})
_RESPONSE_EVENTS_EARLY = frozenset({b"response.created", b"response.queued", b"response.in_progress"})
_ERROR_EVENT = b"error"
_FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed", "response.cancelled"})
_EARLY_TYPES = frozenset({"response.created", "response.queued", "response.in_progress"})

# Where the observer is within a line that began in an earlier chunk.
_AT_LINE_START, _IN_DATA, _IN_NAME, _IN_OTHER = 0, 1, 2, 3
_NAME_MAX = 256  # an event name longer than this is no name meter knows


def _holds_usage_object(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """Whether a Chat Completions chunk has `"usage": {...}` rather than `"usage": null`."""
    if end is None:
        end = len(buf)
    i = buf.rfind(b'"usage"', start, end)
    if i < 0:
        return False
    j = i + 7
    while j < end and buf[j] in b" \t\r\n:":
        j += 1
    return buf[j : j + 1] == b"{"


def _is_error_chunk(buf: bytes | bytearray, start: int = 0) -> bool:
    """Whether a Chat Completions payload is `{"error": ...}` (a chunk starts `{"id":`)."""
    return buf.find(b'"error"', start, start + 24) >= 0


class SSEObserver:
    """Incremental observer of a Server-Sent Events body.

    `feed` takes each chunk as relayed; `finish` returns the observation.  Each
    byte is scanned for line ends once, whatever the chunking: a line that spans
    chunks is carried as state (which field it is), not as bytes to rescan.  A
    data line is kept only while the event it belongs to may matter, decoded
    only when it does, and an event's data is held whole only up to `max_bytes`;
    past that its head and tail are enough to read identity and usage.
    """

    __slots__ = ("kind", "obs", "_clock", "_max", "_event", "_data", "_skip", "_line", "_start", "_name", "_cr", "_ttft_pending", "_done", "_oversized", "_budget", "output_done")

    def __init__(self, kind: str, clock: Callable[[], float] = time.perf_counter, max_bytes: int = 64 << 20, budget: MeteringBudget | None = None) -> None:
        self.kind = kind  # "responses" or "chat"
        self.obs = Observation()
        self._clock = clock
        self._max = max_bytes
        self._budget = budget
        self._event: bytes | None = None
        self._data: bytes | _Capped | None = None  # the current event's data: one line, or lines joined by LF
        self._skip = False
        self._line = _AT_LINE_START
        self._start = b""  # the first bytes of a line too short yet to say its field
        self._name = b""  # an event name split across chunks, up to _NAME_MAX bytes
        self._cr = False  # a CR ended the data kept so far: dropped if LF follows
        self._ttft_pending = True
        self._done = False  # after the terminal event nothing more is needed
        # The last named event was a `.done` one, no delta after it: the client has the
        # whole output, and a hang-up now still leaves a terminal event to meter (SPEC §2).
        self.output_done = False
        self._oversized = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, chunk: bytes) -> None:
        if self._done:
            return
        if self._line == _AT_LINE_START and self._event is None and self._data is None and not self._start:
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
                    self._parse_lines(chunk, pos, end + 2)  # one whole event: nothing stays pending
                    if self._done:
                        return
                pos = end + 2
            if pos >= n:
                return
            self._parse_lines(chunk, pos, n)
            return
        self._parse_lines(chunk, 0, len(chunk))

    def _parse_lines(self, chunk: bytes, pos: int, n: int) -> None:
        """Read the lines of chunk[pos:n] (bounds, not a slice: an event may be large)."""
        if self._start:
            chunk = self._start + chunk[pos:n]  # at most 6 bytes before it: one copy per split field name
            self._start = b""
            pos, n = 0, len(chunk)
        find = chunk.find
        line = self._line
        if line != _AT_LINE_START:  # a line begun in an earlier chunk goes on
            nl = find(b"\n", pos, n)
            if line == _IN_OTHER:  # nothing of it is kept
                if nl < 0:
                    return
                self._line = _AT_LINE_START
            elif nl < 0:
                self._line_goes_on(chunk, pos, n)
                return
            else:
                self._line_goes_on(chunk, pos, nl)
                self._line_ends()
            pos = nl + 1
        while True:
            nl = find(b"\n", pos, n)
            if nl < 0:
                break
            end = nl - 1 if nl > pos and chunk[nl - 1] == 13 else nl
            if end == pos:
                self._dispatch()
                if self._done:
                    return
            elif not self._skip:
                if chunk.startswith(b"data:", pos):
                    start = pos + 6 if chunk.startswith(b"data: ", pos) else pos + 5
                    # A line past the limit is read through a view: only its head and tail are copied.
                    self._data_line(chunk[start:end] if end - start <= self._max else memoryview(chunk)[start:end])
                elif chunk.startswith(b"event:", pos):
                    start = pos + 7 if chunk.startswith(b"event: ", pos) else pos + 6
                    self._on_event_name(chunk[start:end] if end - start <= _NAME_MAX else chunk[start : start + _NAME_MAX])
            pos = nl + 1
        if pos < n:
            if self._skip:
                self._line = _IN_OTHER  # a line of an event meter skips: nothing of it is kept
            else:
                self._line_begins(chunk, pos, n)

    def _data_line(self, line: bytes | memoryview) -> None:
        data = self._data
        if data is None and type(line) is bytes and len(line) <= self._max:
            self._data = line  # the usual event: one data line, held as it is
            return
        self._more_data().add(line)

    def _more_data(self) -> _Capped:
        """The current event's data, ready for one more line."""
        data = self._data
        if data is None:
            data = self._data = _Capped(self._max, self._budget)
            return data
        if type(data) is bytes:
            first = data
            data = self._data = _Capped(self._max, self._budget)
            data.add(first)
        data.add(b"\n")  # type: ignore[union-attr]
        return data  # type: ignore[return-value]

    def _line_begins(self, chunk: bytes, pos: int, n: int) -> None:
        """A line of an event meter reads starts at chunk[pos] and does not end before chunk[n]."""
        rest = n - pos
        if chunk.startswith(b"data:", pos) and rest > 5:
            self._line = _IN_DATA
            self._more_data()
            self._line_goes_on(chunk, pos + 6 if chunk[pos + 5] == 32 else pos + 5, n)
        elif chunk.startswith(b"event:", pos) and rest > 6:
            self._line = _IN_NAME
            start = pos + 7 if chunk[pos + 6] == 32 else pos + 6
            self._name = chunk[start : min(n, start + _NAME_MAX)]
        elif rest < 7 and (b"data: ".startswith(chunk[pos:n]) or b"event: ".startswith(chunk[pos:n])):
            self._start = chunk[pos:n]
        elif rest == 1 and chunk[pos] == 13:  # the CR of a CRLF blank line, its LF in the next chunk
            self._start = b"\r"
        else:
            self._line = _IN_OTHER  # a comment, `id:`, `retry:`: nothing meter reads

    def _line_goes_on(self, chunk: bytes, start: int, end: int) -> None:
        line = self._line
        if line == _IN_DATA:
            data = self._data
            assert isinstance(data, _Capped)
            if self._cr:
                data.add(b"\r")
                self._cr = False
            if end > start and chunk[end - 1] == 13:  # perhaps the CR of a CRLF: hold it back
                self._cr = True
                end -= 1
            if end - start > _EDGE_MAX:  # a view: past the limit only its end is copied
                data.add(memoryview(chunk)[start:end])
            elif end > start:
                data.add(chunk[start:end] if start or end < len(chunk) else chunk)
        elif line == _IN_NAME:
            room = _NAME_MAX - len(self._name)
            if room > 0:
                self._name += chunk[start : min(end, start + room)]  # a few bytes: bounded by _NAME_MAX

    def _line_ends(self) -> None:
        line, self._line = self._line, _AT_LINE_START
        self._cr = False
        if line == _IN_NAME:
            name = self._name
            self._name = b""
            self._on_event_name(name[:-1] if name.endswith(b"\r") else name)

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
            self.output_done = name.endswith(b".done")
            if name.endswith(b".delta"):
                self._first_token()
                return True
            return self.kind == "responses" and name not in _RESPONSE_EVENTS_FINAL and name not in _RESPONSE_EVENTS_EARLY and name != _ERROR_EVENT
        if chunk.startswith(b":", start):
            return chunk.find(b"\n", start, end) < 0  # a lone comment line (keep-alive)
        if self.kind == "chat" and not self._ttft_pending and self.obs.model is not None and chunk.startswith(b"data: {", start):
            # After the first token only a usage object or an error matters (inlined
            # `_holds_usage_object` and `_is_error_chunk`: this runs per chunk).
            if chunk.find(b'"error"', start + 6, start + 30) >= 0:
                return False
            i = chunk.rfind(b'"usage"', start, end)
            if i < 0:
                return True
            i += 7
            while i < end and chunk[i] in b" \t\r\n:":
                i += 1
            return chunk[i] != 123  # "{"
        return False

    def _on_event_name(self, name: bytes) -> None:
        self._event = name
        self.output_done = name.endswith(b".done")
        if name.endswith(b".delta"):
            self._first_token()
            self._skip = True  # deltas carry no usage
        elif self.kind == "responses" and name not in _RESPONSE_EVENTS_FINAL and name not in _RESPONSE_EVENTS_EARLY and name != _ERROR_EVENT:
            self._skip = True

    def _dispatch(self) -> None:
        event, data = self._event, self._data
        self._event = None
        self._skip = False
        if data is None:
            return
        self._data = None
        if type(data) is bytes:
            payload: bytes | bytearray = data
        elif data.tail is not None:  # type: ignore[union-attr]
            self._oversized = True
            self._oversized_event(event, data.head, data.tail)  # type: ignore[union-attr]
            return
        else:
            payload = data.whole()  # type: ignore[union-attr]
            data.release()  # type: ignore[union-attr]  # read below, then let go
        if self.kind == "chat":
            self._chat_payload(payload)
        else:
            self._responses_payload(event, payload)

    def release(self) -> None:
        """Give back the budget an unfinished event holds (the stream was cut or abandoned)."""
        data = self._data
        if data is not None and type(data) is not bytes:
            data.release()  # type: ignore[union-attr]

    def _decode(self, payload: bytes | bytearray) -> dict[str, Any] | None:
        try:
            obj = _loads(payload)
        except _DecodeError:
            self.obs.unreadable = "invalid JSON in an SSE event"
            return None
        return obj if isinstance(obj, dict) else None

    def _responses_payload(self, event: bytes | None, payload: bytes | bytearray) -> None:
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
        if kind in _FINAL_TYPES:
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

    def _chat_payload(self, payload: bytes | bytearray) -> None:
        if payload == b"[DONE]":
            self.obs.terminal = True
            self._done = True
            return
        if not self._ttft_pending and self.obs.model is not None and not _holds_usage_object(payload) and not _is_error_chunk(payload):
            return  # after the first token only the usage chunk (and the tier on it), or an error, matters
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

    def _oversized_event(self, event: bytes | None, head: bytes, tail: bytearray) -> None:
        """An event past max_bytes, of which only the head and tail were kept."""
        obs = self.obs
        if self.kind == "chat":
            found = _partial_object(head, tail, 0, _CHAT_HEAD, _CHAT_TAIL)
            if isinstance(found.get("error"), dict):
                observe_error(obs, found["error"])
                return
            observe_chat_object(obs, found)
            if b'"choices"' in head:  # a chunk this large carries output
                self._first_token()
            return
        if event is not None:
            kind = event.decode("utf-8", "replace")
        else:
            start = _member_start(head, "type")
            kind = _value_at(head, start) if start is not None else None
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            self._first_token()
        elif kind in _FINAL_TYPES or kind in _EARLY_TYPES:
            start = _member_start(head, "response")
            found = {} if start is None else _partial_response(head, tail, start, kind)
            observe_response_object(obs, found, final=kind in _FINAL_TYPES)
            if kind in _FINAL_TYPES:
                obs.status = obs.status or kind.partition(".")[2]
                obs.terminal = True
                self._done = True
        elif kind == "error":
            found = _partial_object(head, b"", 0, frozenset({"type", "code", "error"}), {})
            observe_error(obs, found.get("error") if isinstance(found.get("error"), dict) else found)
            obs.status = "failed"
            obs.terminal = True
            self._done = True

    def cut(self) -> None:
        """The stream will not be read further: an event begun is not one to decode."""
        self.release()
        self._data = None
        self._line = _AT_LINE_START
        self._start = b""
        self._done = True

    def finish(self) -> Observation:
        if not self._done:
            # A stream may end without the final blank line; the spec says such an
            # event is dropped, but its data is all we have of the terminal event.
            if self._line != _AT_LINE_START or self._start:
                self._parse_lines(b"\n", 0, 1)
            if self._data is not None and not self._done:
                self._dispatch()
        self.release()
        obs = self.obs
        if obs.usage is None and obs.unmetered is None and obs.error_type is None and obs.error_code is None:
            if self._oversized:
                obs.unmetered = "oversized_event"
            elif not obs.terminal:
                obs.unmetered = "no_terminal_event"
            elif self.kind == "chat":
                obs.unmetered = "no_include_usage"  # the SDK's default: no usage chunk was asked for
        return obs


# --- bodies that are not streamed -------------------------------------------


class BodyCollector(_Capped):
    """Keeps a copy of a non-stream body, to be decoded once it ends: whole up to
    max_bytes, past that its head and tail."""

    __slots__ = ("kind",)
    done = False  # a body is read to its end
    output_done = False  # a body's output is done only when the body is

    def __init__(self, kind: str, limit: int = 64 << 20, budget: MeteringBudget | None = None) -> None:
        _Capped.__init__(self, limit, budget)
        self.kind = kind

    feed = _Capped.add

    def cut(self) -> None:
        """The body will not be read to its end: read it as one cut in the middle."""
        if self.tail is None:
            self._spill(b"")

    def finish(self) -> Observation:
        if self.tail is not None:
            return _observe_cut_body(self.kind, self.head, self.tail)
        try:
            return observe_json_body(self.kind, self.whole())
        finally:
            self.release()


# --- content codings -----------------------------------------------------------

# Past max_bytes, decoding stops once the answer has grown more than this many
# times the bytes received: no real answer does (JSON compresses some ten times,
# base64 images hardly at all), a decompression bomb does (gzip's limit is about
# 1,000 times, brotli's and zstd's far more).  Below it, decoding work stays in
# proportion to the bytes the upstream sent, and memory is bounded either way.
_MAX_RATIO = 256
_STEP = 256 << 10  # the largest piece a decoder hands on at once


class _Stop(Exception):
    """Decoding went past what metering may spend on one answer."""


class _Zlib:
    """gzip (members one after another, as RFC 1952 allows) or zlib-wrapped deflate."""

    __slots__ = ("_d", "_wbits", "_step")

    def __init__(self, wbits: int, step: int) -> None:
        self._wbits = wbits
        self._d = zlib.decompressobj(wbits)
        self._step = step

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        d, step = self._d, self._step
        while True:
            out = d.decompress(data, step)
            if out:
                emit(out)
            data = d.unconsumed_tail
            if not data and len(out) < step:
                if not d.eof or self._wbits != _GZIP or not d.unused_data.startswith(b"\x1f"):
                    return  # all input taken; or the end, and what follows is not another member
                data = d.unused_data
                d = self._d = zlib.decompressobj(self._wbits)


_GZIP = 16 + zlib.MAX_WBITS


class _Gzip(_Zlib):
    __slots__ = ()

    def __init__(self, step: int) -> None:
        super().__init__(_GZIP, step)


class _Deflate(_Zlib):
    """`deflate`: RFC 9110 says zlib-wrapped; some servers send it raw.  The first
    two bytes tell which (the test browsers and curl use)."""

    __slots__ = ("_pending",)

    def __init__(self, step: int) -> None:
        self._pending = b""
        self._wbits = zlib.MAX_WBITS
        self._step = step
        self._d = None  # type: ignore[assignment]

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        if self._d is None:
            data = self._pending + data
            if len(data) < 2:
                self._pending = data
                return
            cmf, flg = data[0], data[1]
            wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            self._pending = b""
        super().decode(data, emit)


class _Brotli:
    __slots__ = ("_d", "_step")

    def __init__(self, step: int) -> None:
        self._d = brotli.Decompressor()
        self._step = step

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        d, step = self._d, self._step
        out = d.process(data, output_buffer_limit=step)
        # Output held back by the limit comes out of calls without input; the
        # decoder may say it can take input while some is still held.
        while out or not d.can_accept_more_data():
            emit(out)
            out = d.process(b"", output_buffer_limit=step)


class _ZstdSink:
    __slots__ = ("emit",)

    def __init__(self) -> None:
        self.emit: Callable[[bytes], None] = lambda piece: None

    def write(self, piece: bytes) -> int:
        self.emit(piece)
        return len(piece)


class _Zstd:
    """zstd frames, one after another; the window is capped at 8 MiB as RFC 9659 says a
    decoder should, so a frame cannot make meter hold a larger one."""

    __slots__ = ("_sink", "_w")

    def __init__(self, step: int) -> None:
        self._sink = _ZstdSink()
        self._w = zstandard.ZstdDecompressor(max_window_size=8 << 20).stream_writer(self._sink, write_size=step, write_return_read=True, closefd=False)

    def decode(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        self._sink.emit = emit
        self._w.write(data)


_Decoder = _Zlib | _Brotli | _Zstd

_DECODERS: dict[str, Callable[[int], _Decoder]] = {
    "gzip": _Gzip,
    "x-gzip": _Gzip,
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}
_DECODE_ERRORS = (zlib.error, brotli.error, zstandard.ZstdError)


def _chain(decoder: _Decoder, emit: Callable[[bytes], None]) -> Callable[[bytes], None]:
    return lambda data: decoder.decode(data, emit)


class Decompressing:
    """Wraps an observer so it sees the decoded form of a compressed body.

    Only meter's copy is decoded, in pieces of at most 256 KiB handed on as they
    come, so no decoded copy is held here; the observer bounds what it keeps.
    Codings are undone last first (`Content-Encoding: gzip, br` is gzip, then br).
    The client still receives the upstream's bytes.
    """

    __slots__ = ("inner", "_feed", "_first", "_then", "_limit", "_encoded", "_decoded", "_failed", "_stopped")

    def __init__(self, inner: SSEObserver | BodyCollector, codings: list[str], max_bytes: int = 64 << 20) -> None:
        self.inner = inner
        self._feed = inner.feed
        step = max_bytes if max_bytes < _STEP else _STEP
        emit: Callable[[bytes], None] = self._emit
        for coding in codings[:-1]:  # the first applied is undone last, just before the observer
            emit = _chain(_DECODERS[coding](step), emit)
        self._first = _DECODERS[codings[-1]](step)
        self._then = emit
        self._limit = max_bytes
        self._encoded = 0
        self._decoded = 0
        self._failed = False
        self._stopped = False

    def _emit(self, piece: bytes) -> None:
        decoded = self._decoded + len(piece)
        self._decoded = decoded
        if decoded > self._limit and decoded > _MAX_RATIO * self._encoded:
            raise _Stop
        self._feed(piece)

    def feed(self, chunk: bytes) -> None:
        if self._failed or self._stopped or self.inner.done:
            return
        self._encoded += len(chunk)
        try:
            self._first.decode(chunk, self._then)
        except _Stop:
            self._stopped = True
            self.inner.cut()
        except _DECODE_ERRORS:
            self._failed = True

    def release(self) -> None:
        self.inner.release()

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def output_done(self) -> bool:
        return self.inner.output_done

    def finish(self) -> Observation:
        obs = self.inner.finish()
        if self._failed:
            obs.unreadable = "compressed body could not be decoded"
        if self._stopped and obs.usage is None:
            obs.unmetered = "metered_bytes_limit"
        return obs


class _Unmetered:
    """An answer meter cannot read (a content coding it does not know): relayed, not metered."""

    __slots__ = ("reason",)
    done = True
    output_done = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def feed(self, chunk: bytes) -> None:
        pass

    def release(self) -> None:
        pass

    def finish(self) -> Observation:
        return Observation(unmetered=self.reason)


def observer_for(
    kind: str,
    content_type: str,
    content_encoding: str,
    clock: Callable[[], float] = time.perf_counter,
    max_bytes: int = 64 << 20,
    budget: MeteringBudget | None = None,
) -> SSEObserver | BodyCollector | Decompressing | _Unmetered | None:
    """The observer for an answer, or None when there is nothing to meter in it.

    `kind` is `responses` or `chat` (Chat Completions and Embeddings share a shape).
    `max_bytes` bounds what is held of one body or event (`--max-metered-bytes`),
    `budget` what all answers hold at once (`--max-metered-bytes-total`).  Whoever
    drops an observer without `finish()` calls its `release()`.
    """
    if "text/event-stream" in content_type:
        inner: SSEObserver | BodyCollector = SSEObserver(kind, clock, max_bytes, budget)
    elif "json" in content_type or not content_type:
        inner = BodyCollector(kind, max_bytes, budget)
    else:
        return None
    if not content_encoding:
        return inner
    if content_encoding in _DECODERS:  # the usual case: one coding, as registered
        return Decompressing(inner, [content_encoding], max_bytes)
    codings = [c for c in (part.strip().lower() for part in content_encoding.split(",")) if c and c != "identity"]
    if not codings:
        return inner
    if any(c not in _DECODERS for c in codings):
        return _Unmetered("unknown_encoding")
    return Decompressing(inner, codings, max_bytes)


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
