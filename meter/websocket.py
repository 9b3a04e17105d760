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

Metering is `meter.observe.socket.SocketMeter`'s, one per socket on the
metered path, fed every text message both ways as it is relayed (a
metering error never breaks the relay).  Each response on the socket gets its
own `Flow`; the relay hands each finished one to the addons as its record
(`record`), or, when the record cannot be built, the row of what is certain,
as the HTTP proxy does.  A socket on another path is one request, one row.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import struct
import time
from collections.abc import Awaitable
from typing import Any, Literal

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from .attribution import take_meter_headers
from .flow import Addons, Flow, finished_record
from .identity import KeyIdentities
from .observe import observer_for
from .observe.socket import MAX_WAITING_CREATES, SocketMeter
from .proxy import READ_ON_AFTER_HANGUP, RelayedResponse, answered_too_late, end_to_end_headers, error_body, forwardable_request_headers

log = logging.getLogger("meter")

# The upstream socket: text messages are relayed (and metered) as the bytes that came.
_Upstream = aiohttp.ClientWebSocketResponse[Literal[False]]

TEXT, BINARY, CLOSE, CLOSING = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE, WSMsgType.CLOSING

# How long meter waits for a peer's answer to its close frame before dropping the TCP
# connection: a socket whose other side is gone is closed within this time even when
# the peer is busy streaming and does not read its close frame.
CLOSE_TIMEOUT = 0.5

# Headers of unmasked, unfragmented server frames: prebuilt for short payloads (most
# events), packed for the others (RFC 6455 §5.2).
_SHORT_HEADS = {op: [bytes((0x80 | op, n)) for n in range(126)] for op in (TEXT, BINARY)}
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack

# Close codes that may not be sent in a close frame (RFC 6455 §7.4.1), or none at all.
_UNSENDABLE = frozenset({0, 1004, 1005, 1006, 1015})
NO_STATUS = 1005  # the code of a close frame that carries none (RFC 6455 §7.1.5)


# --- the handshake -------------------------------------------------------------

# The headers of the current task's accepted upgrade (the 101), which ws_connect keeps
# to itself: the response class hands them over here.
_HANDSHAKE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("meter_ws_handshake", default=None)


class _Refused(Exception):
    """The upstream answered the upgrade with something other than a 101: its answer, whole."""

    def __init__(self, status: int, reason: str | None, headers: Any, body: bytes) -> None:
        super().__init__(status)
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


class _HandshakeResponse(aiohttp.ClientResponse):
    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        resp = await super().start(connection)
        if self.status != 101:
            # Raised here, before aiohttp's redirect handling sees the answer: ws_connect
            # cannot be told not to follow a 3xx, and following one would send the client's
            # key elsewhere.  It also keeps the body, which ws_connect's own error drops.
            body = b""
            try:
                body = await self.read()
            except (TimeoutError, aiohttp.ClientError):
                pass
            raise _Refused(self.status, self.reason, self.headers, body)
        sink = _HANDSHAKE.get()
        if sink is not None:
            sink[:] = [self.headers]
        return resp


def _upstream_headers(headers: Any) -> CIMultiDict[str]:
    """The client's handshake headers minus hop-by-hop and `Sec-WebSocket-*`
    (aiohttp makes its own key, version and extensions; subprotocols go as `protocols`)."""
    out = forwardable_request_headers(headers)
    for name in [n for n in out if n.lower().startswith("sec-websocket-")]:
        out.popall(name, None)
    take_meter_headers(out)  # Meter-Tag-* and Meter-Session are meter's (the Flow has them)
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

    def add(self, data: bytes, opcode: WSMsgType) -> None:
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


def _parsed_messages(ws: _Upstream) -> Any:
    """aiohttp's queue of messages parsed and not yet received, or () if it is not where expected.

    Only its emptiness is read: empty means the pump is about to wait, so it is time to
    write what it gathered.  () is always empty, which degrades to a write per message."""
    return getattr(getattr(ws, "_reader", None), "_buffer", ())


class _Socket:
    """Who closed the socket first, and how."""

    __slots__ = (
        "bytes_down", "bytes_up", "closed_by", "closing", "code", "dropped", "hang_up_close", "meter_reason", "read_on_until", "reading_on",
        "room", "upstream_ended",
    )  # fmt: skip

    def __init__(self) -> None:
        self.closed_by: str | None = None  # "client", "upstream" or "meter"
        self.code: int | None = None
        self.meter_reason = "shutting_down"  # why meter closed it: the error_code of what was in flight
        # Message bytes relayed each way on a socket meter does not meter: its one row's
        # request and response bytes (a metered socket counts them per response).
        self.bytes_up = 0
        self.bytes_down = 0
        self.dropped = False  # ended without a close frame
        self.closing: asyncio.Future[bool] | None = None  # the close relayed to the other side
        # The client left right after its output: the upstream is read on, relaying
        # nothing, until this is done (every response ended, or the upstream's side did).
        self.reading_on: asyncio.Future[None] | None = None
        self.read_on_until = 0.0  # the loop's time when reading on gives up
        self.hang_up_close: dict[str, Any] = {}  # the client's close, relayed once reading on ends
        # The client's pump waiting for the upstream to answer a `response.create` (past
        # MAX_WAITING_CREATES), and whether the upstream's pump has ended, which ends that wait.
        self.room: asyncio.Future[None] | None = None
        self.upstream_ended = False

    def read_on_done(self) -> None:
        if self.reading_on is not None and not self.reading_on.done():
            self.reading_on.set_result(None)

    def make_room(self) -> None:
        if self.room is not None and not self.room.done():
            self.room.set_result(None)

    async def room_for_creates(self, meter: SocketMeter) -> None:
        """Until fewer than MAX_WAITING_CREATES creates wait for the upstream's answer (or the
        upstream's side has ended, which the next read from the client then meets): the
        client's messages meanwhile wait in its connection, not in meter's memory."""
        loop = asyncio.get_running_loop()
        while meter.waiting >= MAX_WAITING_CREATES and not self.upstream_ended:
            self.room = loop.create_future()
            meter.on_room = self.make_room
            try:
                await self.room
            finally:
                meter.on_room = None
                self.room = None

    def first(self, side: str, code: int | None, dropped: bool = False) -> bool:
        if self.closed_by is not None:
            return False
        self.closed_by, self.code, self.dropped = side, code, dropped
        return True

    def client_gone(self, client: web.WebSocketResponse) -> bool:
        """The client's connection ended without its close frame, or meter's server closed
        it: `first`, with who it was.  A message past --max-request-bytes is closed 1009
        by meter, a refusal like an HTTP 413, not the client's hang-up."""
        # aiohttp keeps the error it closed the socket for (its close code is the client's answer, or 1006).
        error = client.exception()
        if isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG and self.closed_by is None:
            self.meter_reason = "request_too_large"
            return self.first("meter", WSCloseCode.MESSAGE_TOO_BIG)
        return self.first("client", None, dropped=True)

    def relay_close(self, ws: Any, **close: Any) -> Awaitable[bool]:
        """Close `ws` in a task of its own: the handler is cancelled as soon as the client's
        connection drops, which must not cut the close frame relayed to the upstream."""
        self.closing = asyncio.ensure_future(ws.close(**close))
        return asyncio.shield(self.closing)


def _start_reading_on(meter: SocketMeter | None, socket: _Socket, close: dict[str, Any]) -> bool:
    """Whether the upstream is to be read on now that the client has left (right after
    the output of every response running: `SocketMeter.client_left`); if so, the
    socket says until when, and which close to relay to the upstream after."""
    if meter is None or not meter.client_left():
        return False
    loop = asyncio.get_running_loop()
    socket.reading_on = loop.create_future()
    socket.read_on_until = loop.time() + READ_ON_AFTER_HANGUP
    socket.hang_up_close = close
    meter.on_idle = socket.read_on_done  # the pump ends the wait too, when it ends
    return True


class _Live:
    """An accepted socket, as `WebSocketRelay.shutdown` needs to see it."""

    __slots__ = ("client", "closing", "frames", "meter", "socket", "upstream")

    def __init__(
        self, client: web.WebSocketResponse, frames: _ClientFrames, upstream: _Upstream, meter: SocketMeter | None, socket: _Socket
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
        self.upstream_host = f"{base.host}:{base.port}"  # named in a 502 and its log line; never the userinfo
        self.upstream = str(base.with_scheme({"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)))
        # A gateway's user:password@ is a Basic Authorization for handshakes without their
        # own: aiohttp refuses to send both, and the client's goes as sent (as over HTTP).
        self.upstream_without_userinfo = str(URL(self.upstream, encoded=True).with_user(None))
        self.session = session
        self.addons = addons
        self.identities = identities
        self.max_message_bytes = max_message_bytes  # of a client message, like the HTTP body limit
        self.max_metered_bytes = max_metered_bytes  # a larger message is relayed, and metered from its ends
        self._handshakes: aiohttp.ClientSession | None = None
        self._live: set[_Live] = set()
        self.draining = False  # shutting down: sockets close as their responses end
        self.grace_over = False  # the grace period has ended: what is still open is meter's to cut

    def shutdown(self) -> None:
        """meter is stopping: close each socket (1001) once the responses on it have ended.

        Sockets with nothing in flight close now; the others right after their last
        response's terminal event has been relayed.  Whatever is still open when the
        grace period ends is closed by `close_all`, and recorded as cut by the shutdown.
        """
        self.draining = True
        for live in list(self._live):
            self._drain(live)

    def close_all(self) -> None:
        """The grace period is over: every socket still open closes now (1001), its
        responses recorded as cut by the shutdown.  Left to the server, the handler would be
        cancelled a second later and its connection dropped without a close frame."""
        self.grace_over = True
        for live in list(self._live):
            live.close_soon()

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
        """A response ended: its record to the addons, or, as over HTTP, the row of what is
        certain when the record cannot be built."""
        self.addons.done(flow, finished_record(flow, self.identities))

    async def handle(self, request: web.BaseRequest, flow: Flow) -> web.StreamResponse:
        if not web.WebSocketResponse(protocols=_protocols(request.headers)).can_prepare(request).ok:
            return self._fail(flow, 400, "invalid_websocket_handshake", "The WebSocket handshake is not valid.", "error")
        raw_path = request.raw_path
        headers = _upstream_headers(request.headers)
        base = self.upstream_without_userinfo if "Authorization" in headers else self.upstream
        sink: list[Any] = []
        token = _HANDSHAKE.set(sink)
        try:
            upstream = await self._handshake_session().ws_connect(
                URL(base + raw_path, encoded=True),
                method=request.method,
                headers=headers,
                protocols=_protocols(request.headers),
                autoclose=True,
                autoping=True,
                max_msg_size=0,
                compress=0,
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )
        except _Refused as refused:
            return await self._refused(request, flow, refused)
        except aiohttp.WSServerHandshakeError:  # a 101 that is not a valid upgrade (a refusal is _Refused)
            return self._fail(flow, 502, "invalid_upstream_handshake", "The upstream answered the upgrade with an invalid WebSocket handshake.", "error")
        except asyncio.CancelledError:
            # The client hung up, or meter's grace period ended, before the upstream
            # answered: still one row, as over HTTP.
            self._gave_up(flow)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to reach the upstream is a 502 (or 504), never a bare 500
            if answered_too_late(exc):
                return self._fail(flow, 504, "upstream_timeout", "The upstream did not answer in time.")
            log.warning("upstream WebSocket handshake failed for %s: upstream %s: %s", flow.path, self.upstream_host, type(exc).__name__)
            return self._fail(flow, 502, "upstream_unreachable", f"meter could not reach the upstream {self.upstream_host}: {type(exc).__name__}.")
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

    def _gave_up(self, flow: Flow) -> None:
        """The handshake was abandoned before any answer: no status, nothing sent to the client."""
        flow.transport = "http"  # no socket was opened, like any other handshake that failed
        if self.grace_over:  # told apart as `_end` does for an open socket
            flow.outcome, flow.error_type, flow.error_code = "error", "meter_proxy_error", "shutting_down"
        else:
            flow.outcome = "client_disconnected"
        flow.finished_at = time.perf_counter()
        self.record(flow)

    async def _refused(self, request: web.BaseRequest, flow: Flow, refused: _Refused) -> web.StreamResponse:
        """The upstream refused the upgrade: the client gets its status line, headers and
        body, and no field the upstream did not send."""
        status, headers, body = refused.status, refused.headers, refused.body
        flow.transport = "http"
        flow.ttfb_at = time.perf_counter()
        flow.status_code = status
        flow.response_headers = headers
        flow.outcome = "error"
        observer = observer_for("responses", headers.get("Content-Type", ""), headers.get("Content-Encoding", ""), max_bytes=self.max_metered_bytes)
        if body:
            observer.feed(body)
            flow.observation = observer.finish()
        out_headers = _end_to_end_headers(headers)
        if "Content-Length" in headers:
            out_headers["Content-Length"] = str(len(body))
        response = RelayedResponse(status=status, reason=refused.reason, headers=out_headers)
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

    async def _relay(self, request: web.BaseRequest, flow: Flow, upstream: _Upstream, headers: Any) -> web.StreamResponse:
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
            meter = SocketMeter(self, flow, model, {"x-request-id": rid} if rid else None)
        socket = _Socket()
        frames = _ClientFrames(request)
        live = _Live(client, frames, upstream, meter, socket)
        self._live.add(live)
        if self.draining:
            self._drain(live)
        self.addons.websocket_opened()
        pump = asyncio.create_task(self._upstream_to_client(upstream, client, frames, meter, socket))
        try:
            await self._client_to_upstream(client, upstream, meter, socket, frames)
            try:
                await asyncio.wait_for(pump, CLOSE_TIMEOUT * 3)
            except TimeoutError:
                pass  # wait_for cancelled it
        except asyncio.CancelledError:
            # The client's connection is gone (or meter's grace period is over): close the
            # upstream now, or, right after the output, once the usage is in.
            # During the grace period a cancellation is the client's hang-up; after it, meter's.
            first = socket.first("meter", None, dropped=True) if self.grace_over else socket.client_gone(client)
            if (first and not self.grace_over) or socket.reading_on is not None:
                with contextlib.suppress(BaseException):  # deaf to a second cancellation: the first is re-raised
                    await self._read_on_cancelled(upstream, meter, socket)
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
            self.addons.websocket_closed()
            self._end(flow, meter, socket)
        return client

    async def _read_on_cancelled(self, upstream: _Upstream, meter: SocketMeter | None, socket: _Socket) -> None:
        """`_hang_up` in a handler aiohttp cancelled for the client's lost connection: the
        reads and the close are meter's own, so the cancellation waits for them (the
        caller re-raises it after)."""
        task = asyncio.current_task()
        if task is None or (socket.reading_on is None and not _start_reading_on(meter, socket, {"code": 1001})):
            return  # nothing to read on for: the caller closes what is open
        if task.cancelling():
            task.uncancel()
        await self._hang_up(upstream, meter, socket)

    async def _settle(self, upstream: _Upstream, client: web.WebSocketResponse, socket: _Socket) -> None:
        """Torn down mid-relay: let a close already on its way finish, then close what is open."""
        # Best effort, bounded, and deaf to a second cancellation: the caller re-raises the first.
        if socket.closing is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(socket.closing), CLOSE_TIMEOUT * 2)
        for ws in (upstream, client):
            if not ws.closed:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(ws.close(code=1001), CLOSE_TIMEOUT)

    @staticmethod
    async def _hang_up(upstream: _Upstream, meter: SocketMeter | None, socket: _Socket, **close: Any) -> None:
        """The client left first: relay its close to the upstream, which ends what runs
        there.  Right after the output of every response in flight, the client has whole
        answers, which the provider bills: first read on, relaying nothing, for at most
        READ_ON_AFTER_HANGUP, to meter their terminal events (SPEC §2's rule, on a socket).
        Called again when aiohttp cancelled the handler meanwhile (the client's connection
        ended after its close frame): it waits out the same read-on."""
        loop = asyncio.get_running_loop()
        if socket.reading_on is None:
            _start_reading_on(meter, socket, close)
        if socket.reading_on is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(socket.reading_on), max(0.0, socket.read_on_until - loop.time()))
            close = socket.hang_up_close
        if socket.closing is None:
            await socket.relay_close(upstream, **close)

    @staticmethod
    async def _meter_the_rest(upstream: _Upstream, meter: SocketMeter, socket: _Socket) -> None:
        """Reading on in the upstream's pump: meter what comes, relay nothing, until every
        response running has ended or `read_on_until`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(socket.read_on_until):
                while not meter.idle:
                    msg = await upstream.receive()
                    if msg.type is TEXT:
                        try:
                            meter.on_upstream(msg.data)
                        except Exception:  # metering must never break the relay
                            log.exception("could not meter an upstream message")
                    elif msg.type is not BINARY:
                        return  # the upstream closed or dropped too

    def _end(self, flow: Flow, meter: SocketMeter | None, socket: _Socket) -> None:
        if socket.closed_by == "upstream":
            outcome, error_type, code = "error", "upstream_disconnected", str(socket.code) if socket.code is not None else None
        elif socket.closed_by == "meter":
            outcome, error_type, code = "error", "meter_proxy_error", socket.meter_reason
        else:
            outcome, error_type, code = "client_disconnected", None, None
        if meter is not None:
            meter.end(outcome, error_type, code)
            return
        # A socket on another path is one request: one row for its whole life.
        flow.finished_at = time.perf_counter()
        flow.request_bytes, flow.response_bytes = socket.bytes_up, socket.bytes_down
        flow.outcome = "error" if socket.closed_by == "upstream" and socket.dropped else "completed"
        self.record(flow)

    async def _client_to_upstream(
        self, client: web.WebSocketResponse, upstream: _Upstream, meter: SocketMeter | None, socket: _Socket, frames: _ClientFrames
    ) -> None:
        on_client = meter.on_client if meter is not None else None
        send = upstream.send_frame
        receive = client.receive
        try:
            while True:
                msg = await receive()
                kind = msg.type
                if kind is TEXT:
                    answer = None
                    if on_client is not None:
                        try:
                            answer = on_client(msg.data)
                        except Exception:  # metering must never break the relay
                            log.exception("could not meter a client message")
                    else:
                        socket.bytes_up += len(msg.data)
                    if answer is not None:
                        # Refused (a budget): never sent upstream; the client gets an `error`
                        # event.  The upstream pump flushes before it waits, so this frame
                        # goes out whole between two of its batches.
                        frames.add(answer, TEXT)
                        frames.flush()
                    else:
                        await send(msg.data, TEXT)
                        if meter is not None and meter.waiting >= MAX_WAITING_CREATES:
                            del msg  # relayed: not held while the upstream catches up
                            await socket.room_for_creates(meter)
                            continue
                elif kind is BINARY:
                    if on_client is None:
                        socket.bytes_up += len(msg.data)
                    await send(msg.data, BINARY)
                elif kind is CLOSE:
                    if socket.first("client", msg.data):
                        await self._hang_up(upstream, meter, socket, **_close_args(msg.data, msg.extra))
                    return
                elif kind is CLOSING:
                    return  # the upstream closed first; its pump is closing us
                else:  # CLOSED or ERROR: the client's connection is gone, or meter's server closed it
                    if socket.client_gone(client):
                        await self._hang_up(upstream, meter, socket, code=1001)
                    return
                # Relayed: not held while the next message is awaited, which on an idle
                # socket is for ever (a message may be up to --max-request-bytes).
                del msg
        except (ConnectionError, aiohttp.ClientError):
            # The upstream went away under a send; its pump reports it.
            return

    async def _upstream_to_client(
        self, upstream: _Upstream, client: web.WebSocketResponse, frames: _ClientFrames, meter: SocketMeter | None, socket: _Socket
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
                    # Metered before it is written: a write that finds the client gone
                    # must not cost the message (a terminal event's usage) its metering.
                    if on_upstream is None:
                        socket.bytes_down += len(msg.data)
                    elif kind is TEXT:
                        try:
                            on_upstream(msg.data)
                        except Exception:  # metering must never break the relay
                            log.exception("could not meter an upstream message")
                    if socket.reading_on is None:
                        add(msg.data, kind)
                        if not parsed:  # the pump waits next: write what it gathered first
                            flush()
                            if frames.congested:
                                await frames.drain()
                    del msg  # not held while the next is awaited (an idle socket's last message)
                    continue
                if socket.reading_on is None:
                    flush()
                if kind is CLOSE:
                    # aiohttp reads a close frame with no code as 0; RFC 6455 calls that 1005.
                    if socket.first("upstream", msg.data or NO_STATUS):
                        await socket.relay_close(client, **_close_args(msg.data, msg.extra))
                    return
                elif kind is CLOSING:
                    return  # the client closed first
                else:  # CLOSED or ERROR: the upstream dropped without a close frame
                    if socket.first("upstream", upstream.close_code, dropped=True):
                        await socket.relay_close(client, code=1011, message=b"upstream connection lost")
                    return
        except (ConnectionError, aiohttp.ClientError):
            # The client went away under a send.  Seen here first, the hang-up follows the
            # same rule as when the client's pump sees it (`_hang_up`), this pump doing the
            # reading on itself.
            if socket.client_gone(client):
                if _start_reading_on(meter, socket, {"code": 1001}):
                    await self._meter_the_rest(upstream, meter, socket)  # type: ignore[arg-type]
                if socket.closing is None:
                    await socket.relay_close(upstream, code=1001)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("WebSocket relay (upstream to client) failed")
            if socket.first("upstream", None, dropped=True):
                await socket.relay_close(client, code=1011, message=b"relay error")
        finally:
            socket.read_on_done()  # nothing more comes from the upstream to wait for
            socket.upstream_ended = True
            socket.make_room()
