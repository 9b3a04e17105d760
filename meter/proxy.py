"""Forwarding: every request to the upstream as sent, every answer back as received.

One aiohttp low-level server and one shared `ClientSession`.  The handler reads
the request, forwards it, relays the answer chunk by chunk while an observer
reads a copy, and only after the client has its last byte builds the record
and hands it to the addons.  Nothing here knows about ledgers, metrics or
traces; nothing here ever changes a body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .flow import Addons, Flow, build_record, minimal_record
from .identity import KeyIdentities
from .observe import METERED_KIND, endpoint_for, observer_for

log = logging.getLogger("meter")

# RFC 9110 §7.6.1, plus the de-facto Proxy-Connection.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
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


_HOST_AND_LENGTH = frozenset({"host", "content-length"})  # aiohttp sets both for the upstream


def forwardable_request_headers(headers: Any) -> CIMultiDict[str]:
    return end_to_end_headers(headers, _HOST_AND_LENGTH)


def forwardable_response_headers(headers: Any) -> CIMultiDict[str]:
    return end_to_end_headers(headers)


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
        observe: bool = True,
        websocket: Callable[[web.BaseRequest, Flow], Awaitable[web.StreamResponse]] | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.session = session
        self.addons = addons
        self.identities = identities
        self.max_request_bytes = max_request_bytes
        self.observe = observe  # False only for the benchmark's bare pass-through
        self.websocket = websocket
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def upstream_url(self, raw_path: str) -> URL:
        return URL(self.upstream + raw_path, encoded=True)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.raw_path
        path = raw_path.split("?", 1)[0]
        method = request.method
        flow = Flow(method=method, path=path, endpoint=endpoint_for(method, path), headers=request.headers)
        if method == "GET" and "stream=true" in raw_path:
            flow.stream_query = request.query.get("stream") == "true"
        self.in_flight += 1
        self.idle.clear()
        try:
            if self.websocket is not None and request.headers.get("Upgrade", "").lower() == "websocket":
                flow.transport = "websocket"
                return await self.websocket(request, flow)
            return await self._forward(request, flow, raw_path)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _read_body(self, request: web.BaseRequest, flow: Flow) -> bytes | web.Response:
        declared = request.content_length
        if declared is not None and declared > self.max_request_bytes:
            return self._refuse_too_large(flow)
        if not request.body_exists:
            return b""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse_too_large(flow)
        return body

    def _refuse_too_large(self, flow: Flow) -> web.Response:
        flow.status_code = 413
        flow.outcome = "error"
        flow.error_type, flow.error_code = "meter_proxy_error", "request_too_large"
        body = error_body(f"Request body is larger than meter's limit of {self.max_request_bytes} bytes.", "request_too_large")
        flow.response_bytes = len(body)
        return web.Response(status=413, body=body, content_type="application/json", headers={"Connection": "close"})

    async def _forward(self, request: web.BaseRequest, flow: Flow, raw_path: str) -> web.StreamResponse:
        client_response: web.StreamResponse | None = None
        upstream = None
        try:
            flow.upstream_headers = forwardable_request_headers(request.headers)
            self.addons.request(flow)  # before anything can fail, so every done() has its request()
            body = await self._read_body(request, flow)
            if isinstance(body, web.Response):
                client_response = body
                return body
            flow.request_body = body
            flow.request_bytes = len(body)
            skip = tuple(h for h in _AUTO_HEADERS if h not in request.headers)
            try:
                upstream = await self.session.request(
                    request.method,
                    self.upstream_url(raw_path),
                    headers=flow.upstream_headers,
                    data=body if body or request.body_exists else None,
                    allow_redirects=False,
                    skip_auto_headers=skip,
                )
            except (asyncio.TimeoutError, TimeoutError):
                client_response = self._fail(flow, 504, "upstream_timeout", "The upstream did not answer in time.")
                return client_response
            except aiohttp.ClientError as exc:
                client_response = self._fail(flow, 502, "upstream_unreachable", f"The upstream could not be reached: {type(exc).__name__}.")
                return client_response
            flow.ttfb_at = time.perf_counter()
            flow.status_code = upstream.status
            flow.response_headers = upstream.headers
            client_response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=forwardable_response_headers(upstream.headers))
            kind = METERED_KIND.get(flow.endpoint)
            observer = None
            if kind is not None and self.observe:
                observer = observer_for(kind, upstream.headers.get("Content-Type", ""), upstream.headers.get("Content-Encoding", ""))
            await client_response.prepare(request)
            await self._relay(upstream, client_response, observer, flow)
            if observer is not None:
                flow.observation = observer.finish()
            return client_response
        except (ConnectionResetError, aiohttp.ClientConnectionResetError, asyncio.CancelledError) as exc:
            # The client went away; closing our upstream response cancels the upstream request.
            flow.outcome = "client_disconnected"
            if upstream is not None:
                upstream.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return client_response or web.Response(status=499)
        finally:
            if upstream is not None:
                upstream.release()
            flow.finished_at = time.perf_counter()
            self._finish(flow)

    async def _relay(self, upstream: aiohttp.ClientResponse, client: web.StreamResponse, observer: Any, flow: Flow) -> None:
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
        except (asyncio.TimeoutError, TimeoutError):
            flow.response_bytes = sent
            self._abort_midway(client, flow, "upstream_timeout", "upstream_timeout")
            return
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            flow.response_bytes = sent
            self._abort_midway(client, flow, "error", "upstream_disconnected", type(exc).__name__)
            return
        flow.response_bytes = sent
        await client.write_eof()

    def _abort_midway(self, client: web.StreamResponse, flow: Flow, outcome: str, error_type: str, code: str | None = None) -> None:
        """The upstream failed after headers were sent: end the client's connection the
        same way, so it sees a truncated answer rather than a clean end."""
        flow.outcome = outcome
        flow.error_type = error_type
        flow.error_code = code
        client.force_close()
        transport = client._req.transport if client._req is not None else None  # noqa: SLF001 - no public handle
        if transport is not None:
            transport.abort()

    def _fail(self, flow: Flow, status: int, outcome: str, message: str) -> web.Response:
        flow.status_code = status
        flow.outcome = outcome
        flow.error_type, flow.error_code = "meter_proxy_error", outcome
        body = error_body(message, outcome)
        flow.response_bytes = len(body)
        return web.Response(status=status, body=body, content_type="application/json")

    def _finish(self, flow: Flow) -> None:
        if not self.observe:
            return
        try:
            record = build_record(flow, self.identities)
        except Exception:  # a record must never cost the client its answer
            log.exception("could not build the record of %s %s; recording what is certain", flow.method, flow.path)
            record = minimal_record(flow)
        self.addons.done(flow, record)
