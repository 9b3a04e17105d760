"""Metering one WebSocket of the Responses API (SPEC §2a): which response each message belongs to.

`SocketMeter` is the pure per-socket state machine the relay (meter/websocket.py)
feeds every text message to, both ways.  It makes one `Flow` per response
(transport `websocket`, stream true), so addons see one request per response:
`request` when it starts and a record when it ends.  What an event means for
its response is the interpreter's (`responses.py`), as for SSE; what is
decided here is whose event it is.

Metering stays off the per-message hot path.  A message's type is read from
its first bytes (`{"type":"..."` is how the API and the SDK write them) and
only a few kinds are JSON-decoded: the client's `response.create`, and the
upstream's early and terminal events and `error`.  Output deltas are
recognised by the `.delta` suffix of their type and only stamp the
first-token time.

Lanes: events of a response opened by a `response.create` with a `stream_id`
echo that `stream_id`; responses on one lane run FIFO.  A `response.created`
on a lane with no `response.create` waiting is an automatic successor (after
`response.steer` or a completion): it inherits its predecessor's request facts
and its clock starts at the predecessor's end.  An `error` ends the response
it can be attributed to, and no other (SPEC §2b).

Not imported by the package's `__init__`: meter.flow imports meter.observe.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

from ..bounds import MAX_TEXT, short_key
from ..flow import Flow, Refusal
from .facts import RequestFacts, facts_from_create, facts_from_request
from .jsonio import DecodeError
from .objects import Observation, note_missing_usage
from .responses import (
    DECODED,
    DECODED_TYPES,
    DELTA,
    DELTA_NAMES,
    DELTA_TYPE,
    DONE,
    DONE_TYPE,
    EARLY_TYPES,
    ERROR,
    FINAL_TYPES,
    decode_event,
    message_from_ends,
    observe_event,
    observe_event_shape,
)
from .shapes import decode_create
from .shapes import decode_event as decode_event_shape

# The deltas, as a message that states its type first opens: nearly every message, and
# all a delta changes is the byte count.  Every other event, `.done` ones included, is
# read by its type, which says when a response's output is done (`output_finished`).
_DELTA_HEADS = tuple(b'{"type":"response.%s.delta"' % name for name in DELTA_NAMES)
# The `.done` events of the same parts, and of the output items and content parts
# around them: several per output item, counted on the same fast path, noting where the
# output stood (`done_at`).  Any other `.done` event is noted the same, more slowly.
_DONE_HEADS = tuple(
    b'{"type":"response.%s.done"' % name for name in (b"output_item", b"content_part", b"reasoning_summary_part", *DELTA_NAMES)
)
_TYPE = re.compile(rb'"type"\s*:\s*"([^"\\]*)"')
_STREAM_ID = re.compile(rb'"stream_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
SHAPED_TYPES = EARLY_TYPES | FINAL_TYPES  # the response events read through `shapes.Event`
_CREATE = b'"response.create"'
_BACKSLASH = b"\\"  # in a JSON string, what starts an escape
_ESCAPE = b"\\u"  # the start of a JSON string escape (\u and four hex digits), which can spell any character
_LAST_LANES = 256  # predecessors (per lane) and ended response ids remembered per socket
# `response.create` messages relayed and not yet answered, per socket: meter holds a flow
# (~1 KiB) for each of a client's few dozen bytes until the upstream answers.  Past this
# the relay stops reading the client until one is answered (`waiting`, `on_room`).
MAX_WAITING_CREATES = 256


class _Hooks(Protocol):
    def request(self, flow: Flow) -> None: ...
    def admit(self, flow: Flow) -> Refusal | None: ...


class Relay(Protocol):
    """What the socket meter needs of the relay it meters for."""

    @property
    def addons(self) -> _Hooks: ...  # `request` when a response starts

    @property
    def max_metered_bytes(self) -> int: ...  # a larger message is metered from its ends

    def record(self, flow: Flow) -> None: ...  # a response ended: its record, to the addons


def _event_type(data: bytes) -> bytes | None:
    """The top-level `type` of a message that states it near its start, else None.

    The API writes `{"type":"...",...}`; scalar fields before it (a
    `sequence_number`) are fine, a nested object before it is not trusted.
    """
    if data.startswith(b'{"type":"'):
        end = data.find(b'"', 9, 200)
        return data[9:end] if end > 0 else None
    i = data.find(b'"type":"', 1, 200)
    if i > 0:
        if data.find(b"{", 1, i) >= 0:
            return None
        end = data.find(b'"', i + 8, i + 200)
        return data[i + 8 : end] if end > 0 else None
    m = _TYPE.search(data, 0, 200)  # `"type": "..."`, as Python's json.dumps writes it
    if m is None or data.find(b"{", 1, m.start()) >= 0:
        return None
    return m.group(1)


def _lane(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _lane_of(raw: bytes) -> str | None:
    """The lane a `stream_id` string's raw bytes spell: escapes decoded, as the events
    decoded whole (and the `response.create`) have them, so `"\\u00e9"` is lane "é"."""
    if _BACKSLASH not in raw:
        return raw.decode(errors="replace")
    try:
        return _lane(json.loads(b'"' + raw + b'"'))
    except ValueError:
        return None


def read_create(data: bytes) -> tuple[RequestFacts, str | None] | None:
    """A client message's request facts and lane, if it is a `response.create`; else None.

    The client waits for this before its message is relayed, and a Codex turn carries
    its whole input: msgspec reads just the members the facts take
    (`shapes.CreateMessage`); any other message is read the general way, and reads
    the same either way (tests/test_request_facts_shapes.py)."""
    shape = decode_create(data)
    if shape is not None:
        if shape.type != "response.create":
            return None
        facts = facts_from_create(shape)
        if facts is not None:
            return facts, _lane(shape.stream_id)
    return read_create_generally(data)


def read_create_generally(data: bytes) -> tuple[RequestFacts, str | None] | None:
    """`read_create` of a message decoded whole (orjson, else json)."""
    try:
        obj = decode_event(data)
    except DecodeError:
        return None
    if obj is None or obj.get("type") != "response.create":
        return None
    request = obj
    nested = obj.get("response")
    if isinstance(nested, dict):  # the nested form: {"type": "response.create", "response": {...}}
        request = {**{k: v for k, v in obj.items() if k != "response"}, **nested}
    return facts_from_request(request), _lane(obj.get("stream_id"))


class SocketMeter:
    """Per-socket metering state: responses waiting, open, and the last one per lane."""

    __slots__ = (
        "done_at", "ended", "handshake_model", "last", "on_idle", "on_room", "only", "open", "orphans", "pending", "relay", "response_headers",
        "session", "template", "waiting",
    )  # fmt: skip

    def __init__(self, relay: Relay, template: Flow, handshake_model: str | None, response_headers: Any) -> None:
        self.relay = relay
        self.template = template
        self.handshake_model = handshake_model
        self.response_headers = response_headers
        self.pending: dict[str | None, deque[Flow]] = {}  # response.create sent, no response.created yet
        self.waiting = 0  # flows in `pending`, all lanes
        self.on_room: Callable[[], None] | None = None  # called when `waiting` falls (set while the relay waits for room)
        self.open: dict[str | None, Flow] = {}  # one running response per lane
        self.orphans: dict[str, Flow] = {}  # an open response displaced on its lane (should not happen)
        self.only: Flow | None = None  # the running response, when it is the only one
        self.last: OrderedDict[str | None, tuple[float, float, RequestFacts, str | None]] = OrderedDict()
        self.ended: OrderedDict[str, None] = OrderedDict()  # ids of responses that ended lately
        self.on_idle: Callable[[], None] | None = None  # called once nothing is in flight (set while meter drains)
        # The socket's session (SPEC §10): its first response's id, which every later
        # response that names no conversation, Meter-Session or previous response follows.
        self.session: str | None = None
        # Each running response's byte count when its last `.done` event was counted, by
        # id(flow): equal to its count now, nothing came after that event.
        self.done_at: dict[int, int] = {}

    @property
    def idle(self) -> bool:
        return not self.open and not self.pending and not self.orphans

    @property
    def output_finished(self) -> bool:
        """Responses are running, each has sent its output to the end (its last event a
        `.done` one, no delta after it) and no `response.create` waits: a client that
        goes now has whole answers, which the provider bills, and only their terminal
        events, with the usage, are still to come."""
        if not self.open or self.pending or self.orphans:
            return False
        done_at = self.done_at
        return all(done_at.get(id(flow)) == flow.response_bytes for flow in self.open.values())

    def client_left(self) -> bool:
        """The client closed or dropped the socket: True when meter should read on for the
        usage (`output_finished`).  The responses running then end `client_disconnected`,
        as they would without reading on, but with the usage their terminal events bring."""
        if not self.output_finished:
            return False
        for flow in self.open.values():
            flow.outcome = "client_disconnected"
        return True

    def _new_flow(self) -> Flow:
        t = self.template
        flow = Flow(method=t.method, path=t.path, endpoint="responses", headers=t.headers, transport="websocket")
        flow.meter_headers = t.meter_headers  # the handshake's tags and session apply to every response
        flow.status_code = 101
        flow.response_headers = self.response_headers
        flow.observation = Observation()
        return flow

    # client -> upstream

    def on_client(self, data: bytes) -> bytes | None:
        """Meter a client message; None to relay it, or, for a `response.create` an addon
        refuses (a budget), the `error` event to answer it with instead of relaying it."""
        if _event_type(data) != b"response.create" and _CREATE not in data and _ESCAPE not in data:
            # Nothing in it spells a `response.create`.  The type read from the first
            # bytes alone is not enough to pass a message by: the upstream decodes
            # escapes (`response.\u0063reate`) and takes the last of two `type` keys,
            # and a create meter does not see escapes its budget and its facts.
            return None
        created = read_create(data)
        if created is None:
            return None  # not JSON, or not a `response.create`: relayed, and nothing to meter
        facts, lane = created
        flow = self._new_flow()
        # The facts are read now and the message is relayed: the flow keeps its size, not
        # its bytes (a Codex turn's whole input, held for as long as the response runs,
        # and counted against no bound).
        flow.request_bytes = len(data)
        facts.stream = True  # stream is implicit over a WebSocket
        if facts.model is None:
            facts.model = self.handshake_model
        flow.facts = facts
        self.relay.addons.request(flow)
        refusal = self.relay.addons.admit(flow)
        if refusal is not None:
            return self._refuse(flow, refusal, lane)
        self.pending.setdefault(lane, deque()).append(flow)
        self.waiting += 1
        return None

    def _refuse(self, flow: Flow, refusal: Refusal, lane: str | None) -> bytes:
        """The response is never asked of the upstream: its row (outcome `rejected`, no
        usage) now, and the `error` event, on its lane, that tells the client why."""
        error = {"type": refusal.type, "code": refusal.code, "message": refusal.message, "param": None}
        event: dict[str, Any] = {"type": "error", "status": refusal.status, "error": error}
        if lane is not None:
            event["stream_id"] = lane
        answer = json.dumps(event).encode()
        flow.status_code = refusal.status
        flow.outcome = "rejected"
        flow.error_type, flow.error_code = refusal.type, refusal.code
        flow.response_bytes = len(answer)
        flow.finished_at = time.perf_counter()
        flow.socket_session = self.session
        self.relay.record(flow)
        return answer

    # upstream -> client

    def on_upstream(self, data: bytes) -> None:
        # Nearly every message is a delta of the one running response, past its first
        # token: all it changes is the byte count.  One prefix test, no parsing.
        flow = self.only
        if flow is not None and flow.first_token_at is not None:
            if data.startswith(_DELTA_HEADS):
                flow.response_bytes += len(data)
                return
            if data.startswith(_DONE_HEADS):
                flow.response_bytes += len(data)
                self.done_at[id(flow)] = flow.response_bytes
                return
        try:
            self._on_event(data)
        finally:
            opened = self.open
            self.only = next(iter(opened.values())) if len(opened) == 1 and not self.orphans else None

    def _on_event(self, data: bytes) -> None:
        etype = _event_type(data)
        if etype is not None:
            if etype.endswith(DELTA):
                if self.open:
                    flow = self._flow_of(data)
                    if flow is not None:
                        flow.response_bytes += len(data)
                        if flow.first_token_at is None:
                            flow.first_token_at = time.perf_counter()
                return
            if etype not in DECODED:
                if self.open:
                    flow = self._flow_of(data)
                    if flow is not None:
                        flow.response_bytes += len(data)
                        if etype.endswith(DONE):
                            self.done_at[id(flow)] = flow.response_bytes
                return
        limit = self.relay.max_metered_bytes
        if etype is not None and etype != ERROR and len(data) <= limit:
            # The usual response event, decoded into just what is read of it (`shapes.py`);
            # anything else (a member of another type, an `error`) is read the general way.
            event = decode_event_shape(data)
            if event is not None and event.type in SHAPED_TYPES:
                response = event.response
                if response is None:
                    return
                flow = self._response_flow(event.stream_id, response.id, len(data))
                if flow is not None and observe_event_shape(flow.observation, event.type, response):  # type: ignore[arg-type]
                    self._close(event.stream_id, flow)
                return
        try:
            obj = decode_event(data) if len(data) <= limit else message_from_ends(data, limit)
        except DecodeError:
            return
        if obj is None:
            return
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        lane = _lane(obj.get("stream_id"))
        if kind not in DECODED_TYPES:
            # An unusual layout (the type was not near the start) of an event that only counts.
            flow = self.open.get(lane)
            if flow is not None:
                flow.response_bytes += len(data)
                if kind.endswith(DELTA_TYPE) and flow.first_token_at is None:
                    flow.first_token_at = time.perf_counter()
                elif kind.endswith(DONE_TYPE):
                    self.done_at[id(flow)] = flow.response_bytes
            return
        if kind == "error":
            self._on_error(lane, obj, len(data))
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        flow = self._response_flow(lane, response.get("id") if isinstance(response.get("id"), str) else None, len(data))
        if flow is not None and observe_event(flow.observation, kind, obj):  # type: ignore[arg-type]
            self._close(lane, flow)

    def _response_flow(self, lane: str | None, rid: str | None, size: int) -> Flow | None:
        """The open flow a response event of `size` bytes belongs to (started by it if it
        is the first), or None for a late event of a response already ended."""
        if rid is not None and short_key(rid) in self.ended:
            return None  # a late event of a response already ended (by an `error` event): no second row
        flow = self._open_flow(lane, rid)
        flow.response_bytes += size
        return flow

    def _flow_of(self, data: bytes) -> Flow | None:
        """The open response a (non-decoded) event belongs to."""
        if self.only is not None:
            return self.only
        m = _STREAM_ID.search(data)
        return self.open.get(_lane_of(m.group(1)) if m else None)

    def _open_flow(self, lane: str | None, rid: str | None) -> Flow:
        """The running response `rid` on `lane`, starting it if this is its first event."""
        flow = self.open.get(lane)
        if flow is not None:
            current = flow.observation.response_id if flow.observation is not None else None
            if rid is None or current is None or current == rid:
                return flow
            orphan = self.orphans.pop(rid, None)
            if orphan is not None:
                return orphan
            # A new response while the lane's last one never ended: keep both.
            self.orphans[current] = flow
        elif rid is not None and rid in self.orphans:
            return self.orphans.pop(rid)
        now = time.perf_counter()
        queue = self.pending.get(lane)
        if queue:
            flow = self._answered(queue, lane)
        else:
            # An automatic successor: the clock starts at its predecessor's end.
            flow = self._new_flow()
            last = self.last.get(short_key(lane) if lane is not None else None)
            if last is not None:
                flow.t0, flow.started_at = last[0], last[1]
                flow.facts = dataclasses.replace(last[2], previous_response_id=last[3], generate=True)
            else:
                flow.t0, flow.started_at = now, time.time()
                flow.facts = RequestFacts(stream=True, model=self.handshake_model)
            self.relay.addons.request(flow)
        flow.ttfb_at = now
        self.open[lane] = flow
        return flow

    def _on_error(self, lane: str | None, obj: dict[str, Any], size: int) -> None:
        # Only an event that can be attributed ends a response (SPEC §2b).  An error
        # that names no lane answers a client message: a `response.create` still
        # waiting, or something else the client sent (a bogus message mid-response,
        # which must not end the running response and so hide its billed usage).
        flow = self.open.get(lane) if "stream_id" in obj else None
        if flow is None:
            queue = self.pending.get(lane)
            if not queue:
                return  # an error about something other than a response
            flow = self._answered(queue, lane)
            flow.ttfb_at = time.perf_counter()
            self.open[lane] = flow
        obs = flow.observation
        assert obs is not None
        observe_event(obs, "error", obj)  # ends it `failed`, as over SSE
        flow.response_bytes += size
        self._close(lane, flow)

    def _answered(self, queue: deque[Flow], lane: str | None) -> Flow:
        """The lane's oldest waiting create, which the upstream has now answered."""
        flow = queue.popleft()
        if not queue:
            del self.pending[lane]
        self.waiting -= 1
        if self.on_room is not None:
            self.on_room()
        return flow

    def _close(self, lane: str | None, flow: Flow) -> None:
        now = time.perf_counter()
        if self.open.get(lane) is flow:
            del self.open[lane]
        facts = flow.request_facts()
        rid = flow.observation.response_id if flow.observation is not None else None
        last = self.last
        key = short_key(lane) if lane is not None else None
        # The id becomes a successor's previous_response_id, which the ledger keeps to 256 characters.
        last[key] = (now, flow.started_at + (now - flow.t0), facts, rid[:MAX_TEXT] if rid is not None else None)
        last.move_to_end(key)
        if len(last) > _LAST_LANES:
            last.popitem(last=False)
        if rid is not None:
            ended = self.ended
            ended[short_key(rid)] = None
            if len(ended) > _LAST_LANES:
                ended.popitem(last=False)
        self._finish(flow, now)
        if self.on_idle is not None and self.idle:
            self.on_idle()

    def _finish(self, flow: Flow, now: float) -> None:
        flow.finished_at = now
        self.done_at.pop(id(flow), None)
        obs = flow.observation
        # The socket's first response keeps its own rules; every later one without a
        # session source follows it (see meter.flow's session rules).
        flow.socket_session = self.session
        if self.session is None and obs is not None and obs.response_id is not None:
            self.session = obs.response_id[:MAX_TEXT]
        if obs is not None:
            if not flow.request_facts().generate:
                obs.usage = None  # a warm-up (`generate: false`) carries no consumption
            elif obs.usage is None:
                note_missing_usage(obs, "responses")  # it ended without saying what it used
        self.relay.record(flow)

    def end(self, outcome: str, error_type: str | None = None, error_code: str | None = None) -> None:
        """The socket closed: every response still running ends with `outcome`."""
        now = time.perf_counter()
        flows = [*self.open.values(), *self.orphans.values()]
        for queue in self.pending.values():
            flows.extend(queue)
        self.open.clear()
        self.orphans.clear()
        self.pending.clear()
        self.waiting = 0
        if self.on_room is not None:
            self.on_room()
        self.only = None
        for flow in sorted(flows, key=lambda f: f.t0):
            flow.outcome = outcome
            if error_type is not None:
                flow.error_type, flow.error_code = error_type, error_code
            self._finish(flow, now)
