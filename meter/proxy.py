"""Forwarding: every request to the upstream as sent, every answer back as received.

One aiohttp low-level server and one shared `ClientSession`.  The handler reads
the request, forwards it, relays the answer chunk by chunk while an observer
reads a copy, and only after the client has its last byte queues the flow,
whose record is built and handed to the addons with the others finished in the
same turn of the loop (meter/finishing.py).  Nothing here knows about ledgers,
metrics or traces; nothing here ever changes a body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import HttpProcessingError, HttpVersion11
from multidict import CIMultiDict
from yarl import URL

from .attribution import take_meter_headers
from .finishing import FinishedFlows
from .flow import Addons, Flow, Refusal
from .identity import KeyIdentities
from .observe import METERED_KIND, MeteringBudget, endpoint_for, observer_for
from .observe.codings import content_codings, decoded_copy
from .paths import normalised_path, origin_form, target_for_record

log = logging.getLogger("meter")

# RFC 9110 §7.6.1, plus the de-facto Proxy-Connection.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Seconds between two "upstream request failed" lines (an outage fails every request).
UNREACHABLE_LOG_EVERY = 10.0
# How long meter reads on after a client hung up at the end of the output (SPEC §2).
READ_ON_AFTER_HANGUP = 2.0
# Headers aiohttp's client would invent if the client did not send them.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def error_body(message: str, code: str) -> bytes:
    """An OpenAI-shaped error for failures that are meter's to report."""
    return json.dumps({"error": {"message": message, "type": "meter_proxy_error", "code": code, "param": None}}).encode()


def _connection_tokens(headers: Any) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(","))
    return tokens


def end_to_end_headers(headers: Any, also_drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones (RFC 9110 §7.6.1, and any the Connection header
    names) and `also_drop`; order and repeats kept."""
    drop = HOP_BY_HOP | also_drop
    if "Connection" in headers:
        drop = drop | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


# aiohttp sets Host and Content-Length for the upstream; meter answers Expect itself
# (an upstream that honours `100-continue` would wait for a 100 meter never relays).
_SET_BY_METER = frozenset({"host", "content-length", "expect"})


def forwardable_request_headers(headers: Any) -> CIMultiDict[str]:
    return end_to_end_headers(headers, _SET_BY_METER)


def forwardable_response_headers(headers: Any) -> CIMultiDict[str]:
    return end_to_end_headers(headers)


# Fields aiohttp's server adds to any answer that lacks them (a default Content-Type
# for a body, its own name as Server): not the upstream's, so never relayed.  Date it
# adds too, and stays: RFC 9110 §6.6.1 has a proxy add one to an answer without it.
_INVENTED_BY_AIOHTTP = ("Content-Type", "Server")


# Control characters (all but HTAB) are invalid in a reason phrase or field value, and
# aiohttp's writer refuses them; its client's parser lets all but NUL, CR and LF through.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class RelayedResponse(web.StreamResponse):
    """The upstream's answer as the client gets it: its status, reason and fields,
    and no field the upstream did not send."""

    async def _prepare_headers(self) -> None:
        # aiohttp's (private) last step before the head is written: the one place to
        # take back what it added.
        absent = [name for name in _INVENTED_BY_AIOHTTP if name not in self.headers]
        await super()._prepare_headers()
        for name in absent:
            self.headers.popall(name, None)

    async def _write_headers(self) -> None:
        try:
            await super()._write_headers()
        except ValueError:
            # A control character aiohttp will not write (nothing was): each becomes a
            # space, as RFC 9110 §5.5 lets a recipient forward such a field, rather than
            # the answer failing here.  Checked only on failure: the usual head pays nothing.
            self._reason = _CONTROL.sub(" ", self._reason)
            fields = [(name, _CONTROL.sub(" ", value)) for name, value in self._headers.items()]
            self._headers.clear()
            self._headers.extend(fields)
            await super()._write_headers()


# SO_LINGER on, zero seconds: closing the socket sends a reset, not an orderly FIN.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# A request head up to this size is what any connection may hold, like its buffers;
# past it (up to 128 fields of 64 KiB: ~8 MB, ~15 MiB once parsed) the head counts
# against --max-buffered-request-bytes while its body is read.
HEAD_HELD_FREE = 64 * 1024


def _held_head_bytes(raw_headers: tuple[tuple[bytes, bytes], ...]) -> int:
    """What a request head holds once past `HEAD_HELD_FREE`, else 0: twice its bytes,
    the raw fields and their parsed copy (`request.headers`) both being kept."""
    size = sum(len(name) + len(value) for name, value in raw_headers)
    return 2 * size if size > HEAD_HELD_FREE else 0


class MalformedRequestLog(logging.Filter):
    """aiohttp's server logs each malformed request at ERROR with a traceback that
    quotes the offending bytes (a key, if a bad byte sat in `Authorization`).  A
    client's malformed request is not meter's error: this turns the record into one
    WARNING line naming the client and the kind of error (aiohttp's class), never
    the bytes.  Not even the start of aiohttp's message: for some errors the message
    is the client's bytes themselves (an invalid request target is the target)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed request from %s refused (%s %s)"
            record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "?", exc.code, type(exc).__name__)
            record.exc_info = record.exc_text = None
        return True


MALFORMED_REQUEST_LOG = MalformedRequestLog()


def _one_line(exc: BaseException) -> str:
    """An exception as one short log line: its type and the first line of its text."""
    text = str(exc).strip().split("\n", 1)[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _framing_shows_the_end(client: web.StreamResponse, request: web.BaseRequest) -> bool:
    """Whether the client can tell a cut answer from a whole one by its framing: a
    Content-Length it did not get all of, or chunks without the last one (HTTP/1.1
    without a length is always chunked).  An HTTP/1.0 answer without a length ends
    where the connection does."""
    return client.content_length is not None or request.version >= HttpVersion11


def _connection_end(upstream: aiohttp.ClientResponse, method: str) -> asyncio.Future[None] | None:
    """How the upstream's connection ends, for an answer that ends where it does (no
    length, no chunks): aiohttp reads a reset there as the end of the body, which it
    cuts instead.  None for any other answer."""
    headers = upstream.headers
    if method == "HEAD" or upstream.status in (204, 304) or "Content-Length" in headers:
        return None
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return None
    connection = upstream.connection
    closed = connection.protocol.closed if connection is not None and connection.protocol is not None else None
    if closed is not None:
        closed.add_done_callback(_retrieved)  # looked at or not, never "exception was never retrieved"
    return closed


def _retrieved(closed: asyncio.Future[None]) -> None:
    if not closed.cancelled():
        closed.exception()


def _reset_that_ended(closed: asyncio.Future[None] | None) -> BaseException | None:
    """The error that ended the connection (a reset), once the body has ended with it."""
    if closed is None or not closed.done() or closed.cancelled():
        return None
    exc = closed.exception()
    return (exc.__cause__ or exc) if exc is not None else None  # aiohttp's wrapper, caused by the OSError


def answered_too_late(exc: BaseException) -> bool:
    """Whether an upstream request failed by timing out once connected (504).  aiohttp's
    `ConnectionTimeoutError` is a `TimeoutError` too, but an upstream meter could not
    connect to is unreachable (502, SPEC §2), as when it refuses the connection."""
    return isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError)


def _upstream_failure(exc: BaseException) -> str:
    """Why the upstream request failed, for the log.  Only a socket error's text is
    kept (it names the upstream's host and the OS error); other errors may quote the
    request's URL, whose query can carry a key."""
    return _one_line(exc) if isinstance(exc, OSError) else type(exc).__name__


class Proxy:
    """The request handler. `handle` is given to `aiohttp.web.Server`."""

    def __init__(
        self,
        upstream: str,
        session: aiohttp.ClientSession,
        addons: Addons,
        identities: KeyIdentities,
        *,
        max_request_bytes: int = 64 << 20,
        client_timeout: float = 60.0,
        max_metered_bytes: int = 64 << 20,
        max_buffered_request_bytes: int = 256 << 20,
        max_metered_bytes_total: int = 256 << 20,
        observe: bool = True,
        websocket: Callable[[web.BaseRequest, Flow], Awaitable[web.StreamResponse]] | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        parsed = URL(self.upstream)
        self.upstream_host = f"{parsed.host}:{parsed.port}"  # named in a 502 and its log line; never the userinfo
        # A gateway's user:password@ becomes a Basic Authorization, for requests without
        # their own: aiohttp refuses to send both (a 502 for every keyed request), and the
        # client's Authorization is forwarded as sent.
        self.upstream_without_userinfo = str(URL(self.upstream, encoded=True).with_user(None))
        self.upstream_has_userinfo = parsed.user is not None
        # An outage fails every request: one warning line per UNREACHABLE_LOG_EVERY seconds, with a count of the rest.
        self._unreachable_logged_at = -UNREACHABLE_LOG_EVERY
        self._unreachable_unlogged = 0
        self.session = session
        self.addons = addons
        self.identities = identities
        self.finished = FinishedFlows(addons, identities)
        self.max_request_bytes = max_request_bytes
        self.client_timeout = client_timeout  # longest silence while a client sends its body
        self.max_metered_bytes = max_metered_bytes  # for the observers: what one answer may hold
        self.metering_budget = MeteringBudget(max_metered_bytes_total)  # what all of them hold at once
        # One budget for all request bodies being read: memory is bounded by settings,
        # not by how many clients upload at once.
        self.max_buffered_request_bytes = max_buffered_request_bytes
        self.buffered_request_bytes = 0
        self.observe = observe  # False only for the benchmark's bare pass-through
        self.websocket = websocket
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # Set by `Meter.stop` once the shutdown grace period is over: a handler cancelled
        # after that is cut by meter, not by its client (which during the grace period
        # may still hang up, and is then `client_disconnected` as ever).
        self.shutting_down = False
        # aiohttp's server (proxy and admin ports) logs a client's malformed request as one line.
        logging.getLogger("aiohttp.server").addFilter(MALFORMED_REQUEST_LOG)

    def upstream_url(self, raw_path: str, own_authorization: bool = False) -> URL:
        base = self.upstream_without_userinfo if own_authorization else self.upstream
        return URL(base + raw_path, encoded=True)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.raw_path
        method = request.method
        if method == "CONNECT" or raw_path[:1] != "/":
            # Only the configured upstream is ever contacted: a target that is not a path
            # on it is refused, an absolute URL is reduced to its path and query.
            origin = origin_form(raw_path) if method != "CONNECT" else None
            try:
                request = request.clone(rel_url=URL(origin, encoded=True)) if origin is not None else request
            except ValueError:
                origin = None  # a path yarl refuses cannot be forwarded either
            if origin is None:
                return await self._refuse_target(request, method, raw_path)
            raw_path = origin
        path = raw_path.split("?", 1)[0]
        flow = Flow(method=method, path=path, endpoint=endpoint_for(method, normalised_path(path)), headers=request.headers)
        if method == "GET" and "stream=true" in raw_path:
            flow.stream_query = request.query.get("stream") == "true"
        self.in_flight += 1
        self.idle.clear()
        try:
            if self.websocket is not None and request.headers.get("Upgrade", "").lower() == "websocket":
                flow.transport = "websocket"
                # The relay's records read identity from these: what the upstream receives.
                flow.headers = end_to_end_headers(request.headers)
                flow.meter_headers = take_meter_headers(flow.headers)  # meter's own: tags and session
                return await self.websocket(request, flow)
            return await self._forward(request, flow, raw_path)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _refuse_target(self, request: web.BaseRequest, method: str, target: str) -> web.Response:
        """CONNECT, authority form, `*` or garbage: never forwarded, answered, recorded, and
        the connection closed (a CONNECT's "body" is the tunnel's bytes: never read them)."""
        flow = Flow(method=method, path=target_for_record(target), endpoint="other", headers=request.headers)
        flow.upstream_headers = forwardable_request_headers(request.headers)
        flow.meter_headers = take_meter_headers(flow.upstream_headers)
        self.addons.request(flow)
        if method == "CONNECT":
            response = self._fail(flow, 405, "method_not_allowed", "meter forwards requests to its upstream; it is not a tunnel.", outcome="error")
            response.headers["Allow"] = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        else:
            response = self._fail(flow, 400, "invalid_request_target", "The request target must be a path (or an http(s) URL).", outcome="error")
        try:
            await self._send_and_close(request, response)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the client left first: the refusal is recorded all the same
        finally:
            flow.finished_at = time.perf_counter()
            self._finish(flow)
        return response

    async def _read_body(self, request: web.BaseRequest, flow: Flow) -> bytes | web.Response:
        """The whole request body, or the answer that refuses it (413, 503, 408).

        A declared length is reserved in the shared budget before a byte is read, a
        chunked body as it grows; `flow.reserved` says how much to give back."""
        declared = request.content_length
        if declared is not None and declared > self.max_request_bytes:
            return self._refuse_too_large(flow)
        if not request.body_exists:
            return b""
        if declared and not self._reserve(flow, declared):
            return self._refuse_overloaded(flow)
        content = request.content
        if content.is_eof():
            # The whole body arrived with the headers (the common case): no waiting, so no
            # timer, and one chunk comes back as is.
            body = content.read_nowait()
            if declared is None:
                if len(body) > self.max_request_bytes:  # a chunked body has no declared length to refuse early
                    return self._refuse_too_large(flow)
                if not self._reserve(flow, len(body)):
                    return self._refuse_overloaded(flow)
            return body
        # The head is held for as long as the body takes to arrive: a large one counts.
        head = _held_head_bytes(request.raw_headers)
        if head and not self._reserve(flow, head):
            return self._refuse_overloaded(flow)
        if "Expect" in request.headers and request.version == HttpVersion11:
            await self._continue(request)
        return await self._read_slowly(request, flow, declared)

    async def _continue(self, request: web.BaseRequest) -> None:
        """Answer `Expect: 100-continue` here: the client may send its body now (meter
        has accepted its size), and the upstream never sees the expectation."""
        if request.headers["Expect"].strip().lower() == "100-continue":
            await request.writer.write(_CONTINUE)
            request.writer.output_size = 0  # the answer's own bytes are still to come

    async def _read_slowly(self, request: web.BaseRequest, flow: Flow, declared: int | None) -> bytes | web.Response:
        """Read a body that is still arriving, each silence bounded by client_timeout."""
        content = request.content
        chunks: list[bytes] = []
        size = 0
        timeout = self.client_timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout) as silence:
                while chunk := await content.readany():
                    size += len(chunk)
                    if size > self.max_request_bytes:
                        return self._refuse_too_large(flow)
                    if declared is None and not self._reserve(flow, len(chunk)):
                        return self._refuse_overloaded(flow)
                    chunks.append(chunk)
                    silence.reschedule(loop.time() + timeout)
        except TimeoutError:
            response = self._fail(flow, 408, "client_timeout", f"The request body stalled for {timeout:g} s.", outcome="error")
            await self._send_and_close(request, response)
            return response
        return b"".join(chunks)

    async def _readable_copy(self, request: web.BaseRequest, flow: Flow, body: bytes) -> bytes:
        """The body meter reads the request's facts from: as sent, or decoded when sent
        with a content coding.  A decoded copy counts against the shared budget for
        request bodies while the flow lasts; one that does not fit is not made.

        Decoded in a thread: a few KB of zstd or gzip can expand to the limit (64 MiB),
        which takes a tenth of a second or more, and every stream on the loop would wait."""
        headers = request.headers
        if not body or "Content-Encoding" not in headers:  # the usual request: one lookup
            return body
        content_encoding = ", ".join(headers.getall("Content-Encoding"))
        if not content_codings(content_encoding):
            return body
        room = min(self.max_request_bytes, self.max_buffered_request_bytes - self.buffered_request_bytes)
        decoded = await asyncio.to_thread(decoded_copy, body, content_encoding, room)
        # Other bodies may have taken the room meanwhile: a copy that no longer fits is dropped.
        return decoded if self._reserve(flow, len(decoded)) else b""

    def _reserve(self, flow: Flow, size: int) -> bool:
        if self.buffered_request_bytes + size > self.max_buffered_request_bytes:
            return False
        self.buffered_request_bytes += size
        flow.reserved += size
        return True

    def _refuse_overloaded(self, flow: Flow) -> web.Response:
        return self._close_with(
            self._fail(flow, 503, "meter_overloaded", "meter is reading as many request bodies as it may hold; retry shortly.", outcome="error")
        )

    @staticmethod
    def _close_with(response: web.Response) -> web.Response:
        # The rest of the body is not read: the connection cannot carry another request
        # (aiohttp reads and drops what still comes, for at most its lingering time).
        response.force_close()
        return response

    @staticmethod
    async def _send_and_close(request: web.BaseRequest, response: web.Response) -> None:
        """Answer, then close at once: the client went silent mid-body, and lingering for
        the rest of it (aiohttp's way) would hold the connection for nothing."""
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()  # the answer is flushed before the socket closes

    def _refuse_too_large(self, flow: Flow) -> web.Response:
        message = f"Request body is larger than meter's limit of {self.max_request_bytes} bytes."
        return self._close_with(self._fail(flow, 413, "request_too_large", message, outcome="error"))

    async def _forward(self, request: web.BaseRequest, flow: Flow, raw_path: str) -> web.StreamResponse:
        client_response: web.StreamResponse | None = None
        upstream = None
        observer: Any = None
        read_through: Any = None  # the observer of an answer relayed to its end: finished with the record
        try:
            flow.upstream_headers = forwardable_request_headers(request.headers)
            # Meter-Tag-* and Meter-Session are meter's: never forwarded, never identity.
            flow.meter_headers = take_meter_headers(flow.upstream_headers)
            self.addons.request(flow)  # before anything can fail, so every done() has its request()
            body = await self._read_body(request, flow)
            if isinstance(body, web.Response):
                client_response = body
                return body
            flow.request_body = await self._readable_copy(request, flow, body)
            flow.request_bytes = len(body)
            refusal = self.addons.admit(flow)
            if refusal is not None:  # a budget: answered here, never forwarded
                client_response = self._refuse(flow, refusal)
                return client_response
            skip = tuple(h for h in _AUTO_HEADERS if h not in request.headers)
            try:
                upstream = await self.session.request(
                    request.method,
                    self.upstream_url(raw_path, own_authorization=self.upstream_has_userinfo and "Authorization" in flow.upstream_headers),
                    headers=flow.upstream_headers,
                    data=body if body or request.body_exists else None,
                    allow_redirects=False,
                    skip_auto_headers=skip,
                )
            except Exception as exc:  # noqa: BLE001 - whatever failed, the client gets a 502 (or 504), never a bare 500
                if answered_too_late(exc):
                    client_response = self._fail(flow, 504, "upstream_timeout", "The upstream did not answer in time.")
                    return client_response
                self._log_unreachable(flow, exc)
                message = f"meter could not reach the upstream {self.upstream_host}: {type(exc).__name__}."
                client_response = self._fail(flow, 502, "upstream_unreachable", message)
                return client_response
            flow.ttfb_at = time.perf_counter()
            # Before anything else awaits: how the connection ends can only be watched
            # from before it does (a reset that came with the head itself goes unseen).
            ending = _connection_end(upstream, flow.method)
            flow.status_code = upstream.status
            flow.response_headers = upstream.headers
            client_response = RelayedResponse(status=upstream.status, reason=upstream.reason, headers=forwardable_response_headers(upstream.headers))
            kind = METERED_KIND.get(flow.endpoint)
            if kind is not None and self.observe:
                headers = upstream.headers
                observer = observer_for(
                    kind, headers.get("Content-Type", ""), headers.get("Content-Encoding", ""), max_bytes=self.max_metered_bytes, budget=self.metering_budget
                )
            await client_response.prepare(request)
            await self._relay(upstream, client_response, observer, flow, ending)
            read_through, observer = observer, None
            return client_response
        except (ConnectionResetError, aiohttp.ClientConnectionResetError, asyncio.CancelledError) as exc:
            # The client went away, or meter's shutdown cut the answer (recorded as the
            # WebSocket relay records it); closing our upstream response cancels the upstream request.
            if self.shutting_down and isinstance(exc, asyncio.CancelledError):
                flow.outcome, flow.error_type, flow.error_code = "error", "meter_proxy_error", "shutting_down"
            else:
                flow.outcome = "client_disconnected"
            if upstream is not None:
                upstream.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return client_response or web.Response(status=499)
        finally:
            if upstream is not None:
                upstream.release()
            if observer is not None:
                observer.release()  # abandoned (or read to the end on a hang-up): its share of the metering budget is free
            flow.finished_at = time.perf_counter()
            self._finish(flow, read_through)
            if flow.reserved:
                self.buffered_request_bytes -= flow.reserved

    def _log_unreachable(self, flow: Flow, exc: BaseException) -> None:
        """One warning line for a failed upstream request, at most one per
        UNREACHABLE_LOG_EVERY seconds; the next one says how many were not logged."""
        now = time.monotonic()
        if now - self._unreachable_logged_at < UNREACHABLE_LOG_EVERY:
            self._unreachable_unlogged += 1
            return
        more = self._unreachable_unlogged
        self._unreachable_logged_at, self._unreachable_unlogged = now, 0
        log.warning(
            "upstream request failed for %s %s: upstream %s: %s%s",
            flow.method, flow.path, self.upstream_host, _upstream_failure(exc),
            f" ({more} more failed since the last such line)" if more else "",
        )

    async def _relay(
        self, upstream: aiohttp.ClientResponse, client: web.StreamResponse, observer: Any, flow: Flow, ending: asyncio.Future[None] | None = None
    ) -> None:
        content = upstream.content
        feed = observer.feed if observer is not None else None
        sent = 0
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                sent += len(chunk)
                if feed is not None:
                    feed(chunk)
                await client.write(chunk)
        except TimeoutError:
            flow.response_bytes = sent
            self._abort_midway(client, flow, "upstream_timeout", "upstream_timeout")
            return
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            self._broke_off(client, flow, sent, exc)
            return
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away.  Mid-output, the upstream is cancelled at once (the
            # caller closes it); right after the output's last `.done` event the client
            # has the whole answer, which the provider bills: read on, relaying nothing,
            # to meter its terminal event.
            flow.response_bytes = sent
            if observer is not None and observer.output_done and not observer.done:
                await self._read_to_the_end(content, observer, flow)
            raise
        flow.response_bytes = sent
        reset = _reset_that_ended(ending)
        if reset is not None:
            self._broke_off(client, flow, sent, reset)
            return
        await client.write_eof()

    def _broke_off(self, client: web.StreamResponse, flow: Flow, sent: int, exc: BaseException) -> None:
        log.warning("upstream answer to %s %s broke off after %d bytes: %s", flow.method, flow.path, sent, _upstream_failure(exc))
        flow.response_bytes = sent
        self._abort_midway(client, flow, "error", "upstream_disconnected", type(exc).__name__)

    @staticmethod
    async def _read_to_the_end(content: aiohttp.StreamReader, observer: Any, flow: Flow) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()  # the handler was cancelled for the hang-up; these reads are ours
        try:
            async with asyncio.timeout(READ_ON_AFTER_HANGUP):
                while not observer.done:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    observer.feed(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        flow.observation = observer.finish()

    def _abort_midway(self, client: web.StreamResponse, flow: Flow, outcome: str, error_type: str, code: str | None = None) -> None:
        """The upstream failed after headers were sent: end the client's connection the
        same way, so it sees a truncated answer rather than a clean end."""
        flow.outcome = outcome
        flow.error_type = error_type
        flow.error_code = code
        client.force_close()
        request = client._req  # aiohttp has no public handle on the transport
        transport = request.transport if request is not None else None
        if request is None or transport is None:
            return
        if not _framing_shows_the_end(client, request):
            # The answer ends where the connection does: a FIN would make the part sent
            # look whole, a reset says it was cut.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        transport.abort()

    def _fail(self, flow: Flow, status: int, code: str, message: str, outcome: str | None = None) -> web.Response:
        flow.status_code = status
        flow.outcome = outcome or code
        flow.error_type, flow.error_code = "meter_proxy_error", code
        body = error_body(message, code)
        flow.response_bytes = len(body)
        return web.Response(status=status, body=body, content_type="application/json")

    @staticmethod
    def _refuse(flow: Flow, refusal: Refusal) -> web.Response:
        """An addon's refusal (a budget): its status and error, row outcome `rejected`."""
        flow.status_code = refusal.status
        flow.outcome = "rejected"
        flow.error_type, flow.error_code = refusal.type, refusal.code
        error = {"error": {"message": refusal.message, "type": refusal.type, "code": refusal.code, "param": None}}
        body = json.dumps(error).encode()
        flow.response_bytes = len(body)
        response = web.Response(status=refusal.status, body=body, content_type="application/json")
        for name, value in refusal.headers:
            response.headers[name] = value
        return response

    def _finish(self, flow: Flow, observer: Any = None) -> None:
        """Queue the flow: its observer's reading and its record are made with the others
        finished in this turn of the loop (meter/finishing.py)."""
        if self.observe:
            self.finished.add(flow, observer)
