"""One request's journey through meter, and the hooks that observe it.

A `Flow` carries what the proxy learns while forwarding (timings, status, the
observation of the bytes).  Addons are small objects whose methods are named
after the events they hear (`HOOKS`); `Addons` is the one registry: it takes
the ordered list (`meter.server.default_addons`), resolves each hook once to
the bound methods that implement it, and the core (the proxy, the WebSocket
relay, the server's start and stop) calls the hooks by name without knowing
who listens, the mitmproxy pattern.  Order matters for `done`: enrichers
(prices) run before sinks (ledger, metrics, traces).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .attribution import DROPPED_TAG, header_session, header_tags, merge_tags
from .bounds import MAX_TEXT, keep_text_short, note_overflow
from .identity import KeyIdentities
from .observe import Observation, RequestFacts, Usage, request_facts, unfit_counts, usage_anomalies
from .observe.facts import tags_json
from .record import Record

log = logging.getLogger("meter")


@dataclass(slots=True)
class Flow:
    method: str
    path: str  # without the query: queries may carry credentials
    endpoint: str
    headers: Any  # the client's request headers (multidict); a WebSocket's are end-to-end only
    transport: str = "http"
    id: str | None = None  # the ledger writer mints one when the record is written
    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    request_body: bytes = b""
    request_bytes: int = 0
    stream_query: bool = False  # `?stream=true`: how a GET (a resumed stream) asks for one
    upstream_headers: Any = None  # what goes upstream; addons may add to it (traceparent)
    meter_headers: Any = None  # Meter-Tag-* and Meter-Session, taken off the upstream request: (name, value) pairs
    socket_session: str | None = None  # a WebSocket response's default session: the socket's (SPEC §10)
    reserved: int = 0  # bytes of the proxy's request-body budget this flow holds
    status_code: int | None = None
    response_headers: Any = None
    ttfb_at: float | None = None
    first_token_at: float | None = None  # set for WebSocket responses; HTTP reads it from the observation
    finished_at: float | None = None
    response_bytes: int = 0
    observation: Observation | None = None
    facts: RequestFacts | None = None  # parsed lazily: after the answer is relayed
    outcome: str | None = None  # set by the proxy for failures it saw itself
    error_type: str | None = None
    error_code: str | None = None
    trace_id: str | None = None
    state: dict[str, Any] = field(default_factory=dict)  # addons' private per-flow state

    def request_facts(self) -> RequestFacts:
        if self.facts is None:
            self.facts = request_facts(self.request_body)
        return self.facts

    def request_tags(self) -> dict[str, str]:
        """The tags the row will have (`meter.attribution.request_tags`): the body's
        metadata merged with the Meter-Tag-* headers.  Parses the body if not yet done."""
        tags, _ = header_tags(self.meter_headers)
        return merge_tags(self.request_facts().metadata, tags)


# Every hook an addon may implement, in the order of a meter's life.  A public
# method of an addon one letter away from one of these is a misspelled hook.
HOOKS = ("start", "request", "admit", "done", "websocket_opened", "websocket_closed", "stop")


@dataclass(frozen=True, slots=True)
class Refusal:
    """An addon's answer to `admit`: the request is not forwarded; meter answers it with
    `status` and an OpenAI-shaped error (`type`, `code`, `message`), and its row has
    outcome `rejected` and these error fields."""

    status: int
    type: str
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


class Addon(Protocol):  # documentation of the hooks; an addon implements any subset
    async def start(self) -> None: ...  # before the first request; an error stops start-up
    def request(self, flow: Flow) -> None: ...  # a request arrived (a WebSocket: a response started)
    def admit(self, flow: Flow) -> Refusal | None: ...  # its body is read: a Refusal stops it before the upstream
    def done(self, flow: Flow, record: Record) -> None: ...  # its record, once the client has the answer
    def websocket_opened(self) -> None: ...  # a client WebSocket was accepted
    def websocket_closed(self) -> None: ...  # and has ended
    async def stop(self) -> None: ...  # meter is stopping; in the reverse order of start


def _one_edit_apart(a: str, b: str) -> bool:
    """One letter inserted, dropped, changed, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    swapped = a[i : i + 2] == b[i : i + 2][::-1] and a[i + 2 :] == b[i + 2 :]
    return swapped or a[i + 1 :] == b[i + 1 :] or a[i + 1 :] == b[i:] or a[i:] == b[i + 1 :]


def _check_hook_names(addon: object) -> None:
    """Fail at start-up on a hook that would silently never be called."""
    for name in dir(addon):
        if name.startswith("_") or name in HOOKS:
            continue
        for hook in HOOKS:
            # The name first: reading an attribute may run a property.
            if _one_edit_apart(name, hook) and callable(getattr(addon, name, None)):
                raise TypeError(f"{type(addon).__name__}.{name} looks like the hook {hook!r} misspelled (hooks: {', '.join(HOOKS)})")


class Addons:
    """The registry: resolves each hook to the bound methods that implement it, once.

    `request`, `done` and the WebSocket hooks log a failing addon and go on (an
    observer must never break forwarding); `start` lets the error through (a
    ledger that cannot open stops start-up); `stop` logs and goes on, so every
    addon gets its turn to flush.
    """

    __slots__ = ("_admit", "_closed", "_done", "_opened", "_request", "_start", "_stop")

    def __init__(self, addons: Iterable[object] = ()) -> None:
        hooks: dict[str, list[Any]] = {name: [] for name in HOOKS}
        for addon in addons:  # in hook order
            _check_hook_names(addon)
            for name, methods in hooks.items():
                method = getattr(addon, name, None)
                if method is not None:
                    methods.append(method)
        self._start = hooks["start"]
        self._request = hooks["request"]
        self._admit = hooks["admit"]
        self._done = hooks["done"]
        self._opened = hooks["websocket_opened"]
        self._closed = hooks["websocket_closed"]
        self._stop = hooks["stop"][::-1]

    async def start(self) -> None:
        for hook in self._start:
            await hook()

    def request(self, flow: Flow) -> None:
        for hook in self._request:
            try:
                hook(flow)
            except Exception:  # an observer must never break forwarding
                log.exception("addon request hook failed")

    def admit(self, flow: Flow) -> Refusal | None:
        """The first refusal, or None: the request is forwarded.  A failing addon admits
        (a broken check must not stop traffic)."""
        for hook in self._admit:
            try:
                refusal = hook(flow)
            except Exception:
                log.exception("addon admit hook failed")
                continue
            if refusal is not None:
                return refusal
        return None

    def done(self, flow: Flow, record: Record) -> None:
        for hook in self._done:
            try:
                hook(flow, record)
            except Exception:  # an observer must never cost a client its answer
                log.exception("addon done hook failed")

    def websocket_opened(self) -> None:
        for hook in self._opened:
            try:
                hook()
            except Exception:  # nor its socket
                log.exception("addon websocket_opened hook failed")

    def websocket_closed(self) -> None:
        for hook in self._closed:
            try:
                hook()
            except Exception:
                log.exception("addon websocket_closed hook failed")

    async def stop(self) -> None:
        for hook in self._stop:
            try:
                await hook()
            except Exception:  # the others still flush
                log.exception("addon stop failed")


# A token count (input_tokens) and the bookkeeping calls (cancel, delete) may show
# usage, but it is not consumption by this request (SPEC §3).
_NOT_CONSUMPTION = frozenset({"responses.input_tokens", "responses.cancel", "responses.delete"})

_STATUS_OUTCOME = {
    "completed": "completed",
    "incomplete": "incomplete",
    "failed": "failed",
    "queued": "in_progress",
    "in_progress": "in_progress",
    "cancelled": "completed",
}


# Why meter could not read an answer to its end, though the client got all of it.
_UNREAD_TO_THE_END = frozenset({"unknown_encoding", "unknown_content_type", "metered_bytes_limit", "oversized_event"})

# What a record without usage reads its counts from (every one None); never written.
_NO_USAGE = Usage()


def outcome_for(flow: Flow, obs: Observation | None, stream: bool) -> str:
    if flow.outcome is not None:
        return flow.outcome
    status = flow.status_code or 0
    if status >= 400:
        return "error"
    if obs is None:
        return "completed"
    if obs.unmetered in _UNREAD_TO_THE_END and not obs.terminal:
        return "completed"  # relayed whole; that meter could not read its end says nothing of the answer
    if obs.error_code is not None and obs.status in (None, "failed") and obs.usage is None:
        return "failed"
    if obs.status is not None:
        if stream and not obs.terminal and obs.status in ("queued", "in_progress"):
            return "error"  # the stream ended before its terminal event
        return _STATUS_OUTCOME.get(obs.status, "completed")
    if stream and not obs.terminal:
        return "error"
    return "completed"


def _record_of_flow(flow: Flow) -> Record:
    """What the flow itself knows: timing, status, sizes, trace, meter's own error."""
    finished = flow.finished_at or time.perf_counter()
    return Record(
        id=flow.id,
        started_at=flow.started_at,
        finished_at=flow.started_at + (finished - flow.t0),
        method=flow.method,
        path=flow.path,
        endpoint=flow.endpoint,
        transport=flow.transport,
        status_code=flow.status_code,
        stream=flow.stream_query,
        request_bytes=flow.request_bytes,
        response_bytes=flow.response_bytes,
        duration_ms=(finished - flow.t0) * 1000.0,
        trace_id=flow.trace_id,
        error_type=flow.error_type,
        error_code=flow.error_code,
    )


def finished_record(flow: Flow, identities: KeyIdentities) -> Record:
    """A finished flow's record for the addons, over HTTP and WebSocket alike: built in
    full, or, when that fails, the row of what is certain (a record must never cost the
    client its answer, nor the ledger its row)."""
    try:
        return build_record(flow, identities)
    except Exception as exc:  # noqa: BLE001 - see above
        # The type only: the message of an error about the client's values may quote them.
        log.warning("could not build the record of %s %s (%s); recording what is certain", flow.method, flow.path, type(exc).__name__)
        return minimal_record(flow)


def minimal_record(flow: Flow) -> Record:
    """The record of a flow whose details could not be read: still one row, no usage."""
    record = _record_of_flow(flow)
    record.outcome = flow.outcome or ("error" if (flow.status_code or 0) >= 400 else "completed")
    record.error_type = record.error_type or "meter_record_error"
    return record


def build_record(flow: Flow, identities: KeyIdentities) -> Record:
    """Turn a finished flow into its ledger record (usage checked, not priced)."""
    # Once per request: every value is worked out first and the record made in one call
    # of all its fields by position (each later attribute write costs as much as a field
    # of the constructor, and a keyword more than a position).
    facts = flow.facts
    if facts is None:
        facts = flow.facts = request_facts(flow.request_body)
    obs = flow.observation
    t0 = flow.t0
    finished = flow.finished_at or time.perf_counter()
    endpoint = flow.endpoint
    status = flow.status_code
    tags = facts.tags
    meter_headers = flow.meter_headers
    cut = facts.cut
    session = facts.conversation or None
    if meter_headers:
        header_tag_values, dropped = header_tags(meter_headers)
        if header_tag_values:
            tags = tags_json(merge_tags(facts.metadata, header_tag_values))
        if dropped:
            cut = cut + (DROPPED_TAG,) * dropped
        if session is None:
            session = header_session(meter_headers)
    # Identity comes from what the upstream received: a header the client named in
    # `Connection` was dropped on the way, so it cannot attribute the row either.
    headers = flow.upstream_headers if flow.upstream_headers is not None else flow.headers
    identity = identities.of_headers(headers)
    key_id, key_hint, key_name = identity if identity is not None else (None, None, None)
    upstream_request_id = processing_ms = None
    response_headers = flow.response_headers
    if response_headers is not None:
        upstream_request_id = response_headers.get("x-request-id")
        processing = response_headers.get("openai-processing-ms")
        if processing:
            try:
                processing_ms = float(processing)
            except ValueError:
                pass
    error_type, error_code = flow.error_type, flow.error_code
    stream = facts.stream or flow.stream_query
    background = facts.background
    previous_response_id = facts.previous_response_id
    first_token = flow.first_token_at
    model_requested = facts.model
    model = model_requested
    response_id = service_tier = usage = None
    if obs is not None:
        if obs.model is not None:
            model = obs.model
        response_id = obs.response_id
        previous_response_id = obs.previous_response_id or previous_response_id
        service_tier = obs.service_tier
        if obs.background is not None and endpoint == "responses.retrieve":
            background = obs.background  # a GET asks nothing; the response says
        if obs.error_type is not None or obs.error_code is not None:
            error_type = error_type or obs.error_type
            error_code = error_code or obs.error_code
        if obs.unmetered is not None and error_type is None and (status or 0) < 300 and endpoint not in _NOT_CONSUMPTION:
            # A model call whose usage meter could not read: the row says why, and the
            # report counts it (`unmetered_requests`), so nothing goes unmetered silently.
            error_type, error_code = "unmetered", obs.unmetered
        if obs.unreadable and error_type is None and endpoint != "other":
            if obs.usage is None and 200 <= (status or 0) < 300 and endpoint not in _NOT_CONSUMPTION:
                # A model call answered whole whose answer meter could not read: its usage
                # is unknown, so it is unmetered (counted), not only marked unreadable.
                error_type, error_code = "unmetered", "unreadable_response"
            else:
                error_type = "meter_unreadable_response"
        first_token = first_token or obs.first_token_at
        if endpoint not in _NOT_CONSUMPTION:
            usage = obs.usage
    outcome = outcome_for(flow, obs, stream or (obs is not None and obs.first_token_at is not None))
    # The session, SPEC §10, first that applies: the conversation, a Meter-Session
    # header (both above), the session of the previous response, else the row's own
    # response id.  On a WebSocket a response with none of these follows the socket's
    # first response (`socket_session`), so the socket is one session.  Following a
    # response is `session_of`: the in-memory chains settle it, else the ledger writer;
    # `session_id` holds the fallback meanwhile.
    session_of = None
    if session is None:
        socket_session = flow.socket_session
        link = previous_response_id or socket_session
        if link is not None:
            session_of = link[:MAX_TEXT]  # as the ledger keeps the id it names
        session = socket_session or response_id
    project = headers.get("OpenAI-Project")
    user_id = facts.user_id
    ttfb_at = flow.ttfb_at
    started = flow.started_at
    # The ledger's ranges hold from here on (SPEC §2b): a count it cannot keep is NULL
    # before pricing, metrics and budgets read the record, so they all count what it keeps.
    overflowed: str | None = None
    anomalies: tuple[str, ...] = ()
    counts = _NO_USAGE
    if usage is not None:
        overflowed = unfit_counts(usage)
        anomalies = usage_anomalies(usage, endpoint != "embeddings")
        counts = usage
    record = Record(
        flow.id, started, started + (finished - t0), flow.method, flow.path, endpoint, flow.transport, status,
        outcome, stream, background, model_requested, model, response_id,
        previous_response_id, upstream_request_id, facts.service_tier, service_tier,
        counts.input_tokens, counts.cached_tokens, counts.cache_write_tokens, counts.output_tokens, counts.reasoning_tokens,
        counts.total_tokens, counts.web_search_calls, counts.cache_status, counts.cache_missed_tokens, None,
        key_id, key_hint, key_name, project, user_id, tags, session,
        (ttfb_at - t0) * 1000.0 if ttfb_at is not None else None,
        (first_token - t0) * 1000.0 if first_token is not None else None,
        (finished - t0) * 1000.0, processing_ms, flow.request_bytes, flow.response_bytes, error_type, error_code, flow.trace_id,
        anomalies, False, cut, session_of,
    )
    if overflowed is not None:
        note_overflow(record, overflowed)
    # `keep_text_short`'s test of the usual record, all of whose bounded text fits, on the
    # values at hand; a value that is not text is left to it (and to `sanitise`).
    # The client's method, path and asked tier are tested apart: they are not in that
    # sum's budget, and usually far under their bound.
    try:
        short = (len(model or "") + len(model_requested or "") + len(response_id or "") + len(previous_response_id or "")
                 + len(upstream_request_id or "") + len(user_id or "") + len(project or "") + len(session or "")) <= MAX_TEXT and (
            len(flow.path) <= MAX_TEXT and len(flow.method) <= MAX_TEXT and len(facts.service_tier or "") <= MAX_TEXT)
    except TypeError:
        short = False
    if not short:
        keep_text_short(record)
    return record
