"""WebSocket mode of the Responses API (SPEC §2a): relay a socket, meter each response on it.

`WebSocketRelay.handle` is the Proxy's `websocket` callable.  It opens the
upstream socket first (same path, query, headers and subprotocols; `ws`/`wss`
after the upstream's scheme), so that a refused upgrade reaches the client as
the upstream's own status and body, and only then accepts the client.  Two
pumps relay messages both ways, text and binary, unchanged and in order; the
close code and reason of whichever side closed first go to the other side.
Pings are answered per hop (autoping on both sockets).  What goes to the
client is written a batch at a time: every message of one upstream read in one
`writev` (`_ClientFrames`), with the client's backpressure kept.

Metering stays off the per-message hot path.  A message's type is read from
its first bytes (`{"type":"..."` is how the API and the SDK write them) and
only a few kinds are JSON-decoded: the client's `response.create`, and the
upstream's `response.created` / `queued` / `in_progress`, terminal events and
`error`.  Output deltas are recognised by the `.delta` suffix of their type and
only stamp the first-token time.  Each response gets its own `Flow`
(transport `websocket`, stream true), so addons see one request per response:
`addons.request` when it starts and `addons.done` with its record when it ends.

Lanes: events of a response opened by a `response.create` with a `stream_id`
echo that `stream_id`; responses on one lane run FIFO.  A `response.created`
on a lane with no `response.create` waiting is an automatic successor (after
`response.steer` or a completion): it inherits its predecessor's request facts
and its clock starts at the predecessor's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import re
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from .flow import Addons, Flow, build_record
from .identity import KeyIdentities
from .observe import (
    Observation,
    RequestFacts,
    _DecodeError,
    _loads,
    event_from_ends,
    facts_from_request,
    observe_error,
    observe_response_object,
    observer_for,
)
from .proxy import end_to_end_headers, error_body, forwardable_request_headers
from .sanitise import MAX_TEXT, short_key

log = logging.getLogger("meter")

TEXT, BINARY, CLOSE, CLOSING = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE, WSMsgType.CLOSING

# How long meter waits for a peer's answer to its close frame before dropping the TCP
# connection: a socket whose other side is gone is closed within this time even when
# the peer is busy streaming and does not read its close frame.
CLOSE_TIMEOUT = 0.5

_EARLY = frozenset({b"response.created", b"response.queued", b"response.in_progress"})
_FINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed", b"response.cancelled"})
_ERROR = b"error"
_DECODED = _EARLY | _FINAL | {_ERROR}
# Output and reasoning events (`response.output_*`, `response.reasoning_*`): no type
# that is decoded starts so.
_COUNTED_ONLY = (b'{"type":"response.o', b'{"type":"response.r')
_TYPE = re.compile(rb'"type"\s*:\s*"([^"\\]*)"')
_STREAM_ID = re.compile(rb'"stream_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_CREATE = b'"response.create"'

# Headers of unmasked, unfragmented server frames: prebuilt for short payloads (most
# events), packed for the others (RFC 6455 §5.2).
_SHORT_HEADS = {op: [bytes((0x80 | op, n)) for n in range(126)] for op in (TEXT, BINARY)}
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack

# Close codes that may not be sent in a close frame (RFC 6455 §7.4.1), or none at all.
_UNSENDABLE = frozenset({0, 1004, 1005, 1006, 1015})
_LAST_LANES = 256  # predecessors (per lane) and ended response ids remembered per socket


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


def _decode(data: bytes) -> dict[str, Any] | None:
    try:
        obj = _loads(data)
    except _DecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _lane(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --- the handshake -------------------------------------------------------------

# The handshake answer of the current task's ws_connect: aiohttp's ws_connect drops
# the body of a refused upgrade, so the response class hands it over here first.
_HANDSHAKE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("meter_ws_handshake", default=None)


class _HandshakeResponse(aiohttp.ClientResponse):
    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        resp = await super().start(connection)
        sink = _HANDSHAKE.get()
        if sink is not None:
            body = b""
            if self.status != 101:
                try:
                    body = await self.read()
                except (TimeoutError, aiohttp.ClientError):
                    pass
            sink[:] = [self.headers, body]
        return resp


def _upstream_headers(headers: Any) -> CIMultiDict[str]:
    """The client's handshake headers minus hop-by-hop and `Sec-WebSocket-*`
    (aiohttp makes its own key, version and extensions; subprotocols go as `protocols`)."""
    out = forwardable_request_headers(headers)
    for name in [n for n in out if n.lower().startswith("sec-websocket-")]:
        out.popall(name, None)
    return out


def _end_to_end_headers(headers: Any) -> CIMultiDict[str]:
    """The upstream's handshake answer headers that are end-to-end (request ids, rate limits, ...)."""
    out = end_to_end_headers(headers, frozenset({"host", "content-length"}))
    for name in [n for n in out if n.lower().startswith("sec-websocket-")]:
        out.popall(name, None)
    return out


def _protocols(headers: Any) -> list[str]:
    return [p.strip() for value in headers.getall("Sec-WebSocket-Protocol", ()) for p in value.split(",") if p.strip()]


def _close_args(code: int | None, reason: Any) -> dict[str, Any]:
    if code is None or code in _UNSENDABLE or not 1000 <= code <= 4999:
        return {"code": 1000}
    message = reason.encode() if isinstance(reason, str) else (reason or b"")
    return {"code": code, "message": message[:123]}


class _ClientFrames:
    """The messages meter sends its client, written together once per batch.

    aiohttp's `send_frame` writes every frame with a system call of its own, and a
    system call costs more than everything else relaying a small event does.  The
    upstream's events arrive several to a read; the pump appends each one here and
    `flush`es when aiohttp has no further message parsed, so one `writev` carries
    the whole read and nothing waits for a later event.  Frames are the server's:
    unmasked, uncompressed (meter negotiates no extension with its client).
    """

    __slots__ = ("parts", "protocol", "transport")

    def __init__(self, request: web.BaseRequest) -> None:
        self.transport = request.transport
        self.protocol = request.protocol
        self.parts: list[bytes] = []

    def add(self, data: bytes, opcode: int) -> None:
        n = len(data)
        if n < 126:
            head = _SHORT_HEADS[opcode][n]
        elif n < 65536:
            head = _PACK_16(0x80 | opcode, 126, n)
        else:
            head = _PACK_64(0x80 | opcode, 127, n)
        parts = self.parts
        parts.append(head)
        parts.append(data)

    def flush(self) -> None:
        parts = self.parts
        if not parts:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            parts.clear()
            raise ConnectionResetError("the client's connection is closed")
        transport.writelines(parts)
        parts.clear()

    @property
    def congested(self) -> bool:
        """The client reads slower than the upstream sends (the transport paused its writer)."""
        return bool(getattr(self.protocol, "_paused", False))

    async def drain(self) -> None:
        # aiohttp's own writer waits the same way (BaseProtocol._drain_helper).
        await self.protocol._drain_helper()


def _parsed_messages(ws: aiohttp.ClientWebSocketResponse) -> Any:
    """aiohttp's queue of messages parsed and not yet received, or () if it is not where expected.

    Only its emptiness is read: empty means the pump is about to wait, so it is time to
    write what it gathered.  () is always empty, which degrades to a write per message."""
    return getattr(getattr(ws, "_reader", None), "_buffer", ())


# --- metering of one socket ------------------------------------------------------


class _Meter:
    """Per-socket metering state: responses waiting, open, and the last one per lane."""

    __slots__ = ("ended", "handshake_model", "last", "on_idle", "only", "open", "orphans", "pending", "relay", "response_headers", "template")

    def __init__(self, relay: WebSocketRelay, template: Flow, handshake_model: str | None, response_headers: Any) -> None:
        self.relay = relay
        self.template = template
        self.handshake_model = handshake_model
        self.response_headers = response_headers
        self.pending: dict[str | None, deque[Flow]] = {}  # response.create sent, no response.created yet
        self.open: dict[str | None, Flow] = {}  # one running response per lane
        self.orphans: dict[str, Flow] = {}  # an open response displaced on its lane (should not happen)
        self.only: Flow | None = None  # the running response, when it is the only one
        self.last: OrderedDict[str | None, tuple[float, float, RequestFacts, str | None]] = OrderedDict()
        self.ended: OrderedDict[str, None] = OrderedDict()  # ids of responses that ended lately
        self.on_idle: Any = None  # called once nothing is in flight (set while meter drains)

    @property
    def idle(self) -> bool:
        return not self.open and not self.pending and not self.orphans

    def _new_flow(self) -> Flow:
        t = self.template
        flow = Flow(method=t.method, path=t.path, endpoint="responses", headers=t.headers, transport="websocket")
        flow.status_code = 101
        flow.response_headers = self.response_headers
        flow.observation = Observation()
        return flow

    # client -> upstream

    def on_client(self, data: bytes) -> None:
        etype = _event_type(data)
        if etype is None:
            if _CREATE not in data:
                return
        elif etype != b"response.create":
            return
        obj = _decode(data)
        if obj is None or obj.get("type") != "response.create":
            return
        request = obj
        nested = obj.get("response")
        if isinstance(nested, dict):  # the nested form: {"type": "response.create", "response": {...}}
            request = {**{k: v for k, v in obj.items() if k != "response"}, **nested}
        flow = self._new_flow()
        flow.request_body = data
        flow.request_bytes = len(data)
        facts = facts_from_request(request)  # decoded once: a Codex turn carries its whole input
        facts.stream = True  # stream is implicit over a WebSocket
        if facts.model is None:
            facts.model = self.handshake_model
        flow.facts = facts
        lane = _lane(obj.get("stream_id"))
        self.pending.setdefault(lane, deque()).append(flow)
        self.relay.addons.request(flow)

    # upstream -> client

    def on_upstream(self, data: bytes) -> None:
        # Nearly every message is an output or reasoning event of the one running
        # response, past its first token: all it changes is the byte count.  One
        # prefix test, no parsing.
        flow = self.only
        if flow is not None and flow.first_token_at is not None and data.startswith(_COUNTED_ONLY):
            flow.response_bytes += len(data)
            return
        try:
            self._on_event(data)
        finally:
            opened = self.open
            self.only = next(iter(opened.values())) if len(opened) == 1 and not self.orphans else None

    def _on_event(self, data: bytes) -> None:
        etype = _event_type(data)
        if etype is not None:
            if etype.endswith(b".delta"):
                if self.open:
                    flow = self._flow_of(data)
                    if flow is not None:
                        flow.response_bytes += len(data)
                        if flow.first_token_at is None:
                            flow.first_token_at = time.perf_counter()
                return
            if etype not in _DECODED:
                if self.open:
                    flow = self._flow_of(data)
                    if flow is not None:
                        flow.response_bytes += len(data)
                return
        obj = _decode(data) if len(data) <= self.relay.max_metered_bytes else event_from_ends(data, self.relay.max_metered_bytes)
        if obj is None:
            return
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if etype is None and (kind.endswith(".delta") or kind.encode() not in _DECODED):
            # An unusual layout (the type was not near the start) of an event that only counts.
            flow = self.open.get(_lane(obj.get("stream_id")))
            if flow is not None:
                flow.response_bytes += len(data)
                if kind.endswith(".delta") and flow.first_token_at is None:
                    flow.first_token_at = time.perf_counter()
            return
        lane = _lane(obj.get("stream_id"))
        if kind == "error":
            self._on_error(lane, obj, len(data))
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        rid = response.get("id") if isinstance(response.get("id"), str) else None
        if rid is not None and short_key(rid) in self.ended:
            return  # a late event of a response already ended (by an `error` event): no second row
        flow = self._open_flow(lane, rid)
        flow.response_bytes += len(data)
        if kind in ("response.created", "response.queued", "response.in_progress"):
            observe_response_object(flow.observation, response, final=False)  # type: ignore[arg-type]
            return
        obs = flow.observation
        assert obs is not None
        observe_response_object(obs, response, final=True)
        obs.terminal = True
        self._close(lane, flow)

    def _flow_of(self, data: bytes) -> Flow | None:
        """The open response a (non-decoded) event belongs to."""
        if self.only is not None:
            return self.only
        m = _STREAM_ID.search(data)
        return self.open.get(m.group(1).decode() if m else None)

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
            flow = queue.popleft()
            if not queue:
                del self.pending[lane]
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
            flow = queue.popleft()
            if not queue:
                del self.pending[lane]
            flow.ttfb_at = time.perf_counter()
            self.open[lane] = flow
        obs = flow.observation
        assert obs is not None
        error = obj.get("error")
        observe_error(obs, error if isinstance(error, dict) else obj)
        obs.terminal = True
        flow.response_bytes += size
        flow.outcome = "error"
        flow.error_type, flow.error_code = obs.error_type, obs.error_code
        self._close(lane, flow)

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
        obs = flow.observation
        if obs is not None and not flow.request_facts().generate:
            obs.usage = None  # a warm-up (`generate: false`) carries no consumption
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
        self.only = None
        for flow in sorted(flows, key=lambda f: f.t0):
            flow.outcome = outcome
            if error_type is not None:
                flow.error_type, flow.error_code = error_type, error_code
            self._finish(flow, now)


class _Socket:
    """Who closed the socket first, and how."""

    __slots__ = ("closed_by", "closing", "code", "dropped")

    def __init__(self) -> None:
        self.closed_by: str | None = None  # "client", "upstream" or "meter" (shutting down)
        self.code: int | None = None
        self.dropped = False  # ended without a close frame
        self.closing: asyncio.Future[bool] | None = None  # the close relayed to the other side

    def first(self, side: str, code: int | None, dropped: bool = False) -> bool:
        if self.closed_by is not None:
            return False
        self.closed_by, self.code, self.dropped = side, code, dropped
        return True

    def relay_close(self, ws: Any, **close: Any) -> Awaitable[bool]:
        """Close `ws` in a task of its own: the handler is cancelled as soon as the client's
        connection drops, which must not cut the close frame relayed to the upstream."""
        self.closing = asyncio.ensure_future(ws.close(**close))
        return asyncio.shield(self.closing)


class _Live:
    """An accepted socket, as `WebSocketRelay.shutdown` needs to see it."""

    __slots__ = ("client", "closing", "frames", "meter", "socket", "upstream")

    def __init__(
        self, client: web.WebSocketResponse, frames: _ClientFrames, upstream: aiohttp.ClientWebSocketResponse, meter: _Meter | None, socket: _Socket
    ) -> None:
        self.client, self.frames, self.upstream, self.meter, self.socket = client, frames, upstream, meter, socket
        self.closing: asyncio.Task[None] | None = None

    def close_soon(self) -> None:
        if self.closing is None:
            self.closing = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        if self.socket.first("meter", 1001):
            with contextlib.suppress(ConnectionError):
                self.frames.flush()  # messages gathered go before the close frame
            with contextlib.suppress(Exception):  # the pumps see whatever went wrong
                await self.client.close(code=1001, message=b"meter is shutting down")
                await self.upstream.close(code=1001)


class WebSocketRelay:
    """The Proxy's `websocket` callable (`handle`), one per meter."""

    def __init__(
        self,
        upstream: str,
        session: aiohttp.ClientSession,
        addons: Addons,
        identities: KeyIdentities,
        *,
        max_message_bytes: int = 64 << 20,
        max_metered_bytes: int = 64 << 20,
    ) -> None:
        base = URL(upstream.rstrip("/"))
        self.upstream = str(base.with_scheme({"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)))
        self.session = session
        self.addons = addons
        self.identities = identities
        self.gauges = [a for a in addons.addons if hasattr(a, "websocket_opened") and hasattr(a, "websocket_closed")]
        self.max_message_bytes = max_message_bytes  # of a client message, like the HTTP body limit
        self.max_metered_bytes = max_metered_bytes  # a larger message is relayed, and metered from its ends
        self._handshakes: aiohttp.ClientSession | None = None
        self._live: set[_Live] = set()
        self.draining = False

    def shutdown(self) -> None:
        """meter is stopping: close each socket (1001) once the responses on it have ended.

        Sockets with nothing in flight close now; the others right after their last
        response's terminal event has been relayed.  Whatever is still open when the
        grace period ends is cancelled with the server, and recorded as such.
        """
        self.draining = True
        for live in list(self._live):
            self._drain(live)

    def _drain(self, live: _Live) -> None:
        if live.meter is None or live.meter.idle:
            live.close_soon()
        else:
            live.meter.on_idle = live.close_soon

    def _handshake_session(self) -> aiohttp.ClientSession:
        """A session on the shared connector whose responses keep a refused upgrade's body."""
        s = self._handshakes
        if s is None or s.closed:
            shared = self.session
            s = self._handshakes = aiohttp.ClientSession(
                connector=shared.connector,
                connector_owner=False,
                timeout=shared.timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                response_class=_HandshakeResponse,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return s

    def record(self, flow: Flow) -> None:
        try:
            record = build_record(flow, self.identities)
        except Exception:  # a record must never cost the client its socket
            log.exception("could not build the record of a WebSocket response on %s", flow.path)
            return
        self.addons.done(flow, record)

    async def handle(self, request: web.BaseRequest, flow: Flow) -> web.StreamResponse:
        if not web.WebSocketResponse(protocols=_protocols(request.headers)).can_prepare(request).ok:
            return self._fail(flow, 400, "invalid_websocket_handshake", "The WebSocket handshake is not valid.", "error")
        raw_path = request.raw_path
        sink: list[Any] = []
        token = _HANDSHAKE.set(sink)
        try:
            upstream = await self._handshake_session().ws_connect(
                URL(self.upstream + raw_path, encoded=True),
                method=request.method,
                headers=_upstream_headers(request.headers),
                protocols=_protocols(request.headers),
                autoclose=True,
                autoping=True,
                max_msg_size=0,
                compress=0,
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101 or not sink:
                return self._fail(flow, 502, "invalid_upstream_handshake", "The upstream answered the upgrade with an invalid WebSocket handshake.", "error")
            return await self._refused(request, flow, exc.status, sink[0], sink[1])
        except TimeoutError:
            return self._fail(flow, 504, "upstream_timeout", "The upstream did not answer in time.")
        except Exception as exc:  # noqa: BLE001 - any failure to reach the upstream is a 502, never a bare 500
            log.warning("upstream WebSocket handshake failed for %s: %s", flow.path, type(exc).__name__)
            return self._fail(flow, 502, "upstream_unreachable", f"The upstream could not be reached: {type(exc).__name__}.")
        finally:
            _HANDSHAKE.reset(token)
        return await self._relay(request, flow, upstream, sink[0] if sink else CIMultiDict())

    def _fail(self, flow: Flow, status: int, code: str, message: str, outcome: str | None = None) -> web.Response:
        flow.transport = "http"
        flow.status_code = status
        flow.outcome = outcome or code
        flow.error_type, flow.error_code = "meter_proxy_error", code
        body = error_body(message, code)
        flow.response_bytes = len(body)
        flow.finished_at = time.perf_counter()
        self.record(flow)
        return web.Response(status=status, body=body, content_type="application/json")

    async def _refused(self, request: web.BaseRequest, flow: Flow, status: int, headers: Any, body: bytes) -> web.StreamResponse:
        """The upstream refused the upgrade: the client gets its status, headers and body."""
        flow.transport = "http"
        flow.ttfb_at = time.perf_counter()
        flow.status_code = status
        flow.response_headers = headers
        flow.outcome = "error"
        observer = observer_for("responses", headers.get("Content-Type", ""), headers.get("Content-Encoding", ""), max_bytes=self.max_metered_bytes)
        if observer is not None and body:
            observer.feed(body)
            flow.observation = observer.finish()
        out_headers = _end_to_end_headers(headers)
        if "Content-Length" in headers:
            out_headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=out_headers)
        try:
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            flow.response_bytes = len(body)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            flow.outcome = "client_disconnected"
        finally:
            flow.finished_at = time.perf_counter()
            self.record(flow)
        return response

    async def _relay(self, request: web.BaseRequest, flow: Flow, upstream: aiohttp.ClientWebSocketResponse, headers: Any) -> web.StreamResponse:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=True,
            autoping=True,
            max_msg_size=self.max_message_bytes,
            compress=False,
            decode_text=False,
            timeout=CLOSE_TIMEOUT,
        )
        client.headers.update(_end_to_end_headers(headers))
        try:
            await client.prepare(request)
        except BaseException:
            await upstream.close(code=1001)
            raise
        flow.status_code = 101
        flow.ttfb_at = time.perf_counter()
        metered = flow.endpoint == "responses"
        meter = None
        if metered:
            rid = headers.get("x-request-id")
            model = request.rel_url.query.get("model")
            meter = _Meter(self, flow, model, {"x-request-id": rid} if rid else None)
        socket = _Socket()
        frames = _ClientFrames(request)
        live = _Live(client, frames, upstream, meter, socket)
        self._live.add(live)
        if self.draining:
            self._drain(live)
        for gauge in self.gauges:
            gauge.websocket_opened()
        pump = asyncio.create_task(self._upstream_to_client(upstream, client, frames, meter, socket))
        try:
            await self._client_to_upstream(client, upstream, meter, socket)
            try:
                await asyncio.wait_for(pump, CLOSE_TIMEOUT * 3)
            except TimeoutError:
                pass  # wait_for cancelled it
        except asyncio.CancelledError:
            # The client's connection is gone (or meter's grace period is over): close the upstream now.
            socket.first("meter" if self.draining else "client", None, dropped=True)
            pump.cancel()
            await self._settle(upstream, client, socket)
            raise
        except Exception:
            log.exception("WebSocket relay failed on %s", flow.path)
            socket.first("client", None, dropped=True)
            pump.cancel()
            await self._settle(upstream, client, socket)
        finally:
            self._live.discard(live)
            for gauge in self.gauges:
                gauge.websocket_closed()
            self._end(flow, meter, socket)
        return client

    async def _settle(self, upstream: aiohttp.ClientWebSocketResponse, client: web.WebSocketResponse, socket: _Socket) -> None:
        """Torn down mid-relay: let a close already on its way finish, then close what is open."""
        # Best effort, bounded, and deaf to a second cancellation: the caller re-raises the first.
        if socket.closing is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(socket.closing), CLOSE_TIMEOUT * 2)
        for ws in (upstream, client):
            if not ws.closed:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(ws.close(code=1001), CLOSE_TIMEOUT)

    def _end(self, flow: Flow, meter: _Meter | None, socket: _Socket) -> None:
        if socket.closed_by == "upstream":
            outcome, error_type, code = "error", "upstream_disconnected", str(socket.code) if socket.code is not None else None
        elif socket.closed_by == "meter":
            outcome, error_type, code = "error", "meter_proxy_error", "shutting_down"
        else:
            outcome, error_type, code = "client_disconnected", None, None
        if meter is not None:
            meter.end(outcome, error_type, code)
            return
        # A socket on another path is one request: one row for its whole life.
        flow.finished_at = time.perf_counter()
        flow.outcome = "error" if socket.closed_by == "upstream" and socket.dropped else "completed"
        self.record(flow)

    async def _client_to_upstream(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, meter: _Meter | None, socket: _Socket) -> None:
        on_client = meter.on_client if meter is not None else None
        send = upstream.send_frame
        receive = client.receive
        try:
            while True:
                msg = await receive()
                kind = msg.type
                if kind is TEXT:
                    if on_client is not None:
                        try:
                            on_client(msg.data)
                        except Exception:  # metering must never break the relay
                            log.exception("could not meter a client message")
                    await send(msg.data, TEXT)
                elif kind is BINARY:
                    await send(msg.data, BINARY)
                elif kind is CLOSE:
                    if socket.first("client", msg.data):
                        await socket.relay_close(upstream, **_close_args(msg.data, msg.extra))
                    return
                elif kind is CLOSING:
                    return  # the upstream closed first; its pump is closing us
                else:  # CLOSED or ERROR: the client's connection is gone
                    if socket.first("client", None, dropped=True):
                        await socket.relay_close(upstream, code=1001)
                    return
        except (ConnectionError, aiohttp.ClientError):
            # The upstream went away under a send; its pump reports it.
            return

    async def _upstream_to_client(
        self, upstream: aiohttp.ClientWebSocketResponse, client: web.WebSocketResponse, frames: _ClientFrames, meter: _Meter | None, socket: _Socket
    ) -> None:
        on_upstream = meter.on_upstream if meter is not None else None
        add, flush = frames.add, frames.flush
        receive = upstream.receive
        parsed = _parsed_messages(upstream)
        try:
            while True:
                msg = await receive()
                kind = msg.type
                if kind is TEXT or kind is BINARY:
                    add(msg.data, kind)
                    if not parsed:  # the pump waits next: write what it gathered first
                        flush()
                        if frames.congested:
                            await frames.drain()
                    if on_upstream is not None and kind is TEXT:
                        try:
                            on_upstream(msg.data)
                        except Exception:  # metering must never break the relay
                            log.exception("could not meter an upstream message")
                    continue
                flush()
                if kind is CLOSE:
                    if socket.first("upstream", msg.data):
                        await socket.relay_close(client, **_close_args(msg.data, msg.extra))
                    return
                elif kind is CLOSING:
                    return  # the client closed first
                else:  # CLOSED or ERROR: the upstream dropped without a close frame
                    if socket.first("upstream", upstream.close_code, dropped=True):
                        await socket.relay_close(client, code=1011, message=b"upstream connection lost")
                    return
        except (ConnectionError, aiohttp.ClientError):
            # The client went away under a send; its pump (or the cancellation) reports it.
            if socket.first("client", None, dropped=True):
                await socket.relay_close(upstream, code=1001)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("WebSocket relay (upstream to client) failed")
            if socket.first("upstream", None, dropped=True):
                await socket.relay_close(client, code=1011, message=b"relay error")
