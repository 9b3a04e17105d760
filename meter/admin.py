"""The admin port's guard (SPEC §2b): a bearer token, and no open port off loopback.

The admin port serves per-key spend, key names and users (`/api/...`), and
every report forces a ledger flush and a full aggregate, so it is not for
whoever can reach the pod:

- `bearer_auth(token)` is an aiohttp middleware for the admin app: every
  request needs `Authorization: Bearer <token>`, except the probes
  (`/healthz`, `/readyz`), which carry no secret and are asked by callers
  that have none (the kubelet, Docker's HEALTHCHECK), and the console's page
  and static files (meter/console/), which hold no data.  The exemption is
  decided on the route aiohttp matched, not on the raw path, so no spelling
  of a guarded path (`/%6detrics`, `/healthz/../metrics`) slips past it.
  Tokens are compared with `hmac.compare_digest`; a wrong token is a `401`
  whose body never echoes what was sent, and no token is ever logged.
- `check_admin_exposure(settings)` runs before anything is bound: an admin
  address that is not loopback needs a token, or an explicit
  `--admin-insecure` (then one warning line).
- Without a token, `loopback_hosts_only()` (on loopback: DNS rebinding) and
  `same_origin_only()` (a cross-site form post or no-cors fetch) refuse what a
  browser sends on behalf of another site's page.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .config import ADMIN_CHALLENGE, StartupError, parse_host_port
from .console import PAGE_PATHS

log = logging.getLogger("meter")

# Paths anyone who reaches the admin port may ask: liveness and readiness, and the
# console's page and files (no data: the page asks for the token before any).
OPEN_PATHS = frozenset({"/healthz", "/readyz", *PAGE_PATHS})

_UNAUTHORIZED_BODY = json.dumps(
    {
        "error": {
            "message": "the admin API needs Authorization: Bearer <token> (the token meter was started with, METER_ADMIN_TOKEN)",
            "type": "meter_admin_error",
            "code": "unauthorized",
            "param": None,
        }
    }
).encode()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost; any other name or address is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_admin_exposure(admin_listen: str, token: str | None, insecure: bool) -> None:
    """Refuse a non-loopback admin address without a token (StartupError), warn when allowed insecurely."""
    host, _ = parse_host_port(admin_listen)
    if token or is_loopback_host(host):
        return
    if insecure:
        log.warning("admin port %s is not loopback and has no token (--admin-insecure): anyone who can reach it reads reports and metrics", admin_listen)
        return
    raise StartupError(
        f"admin-listen: {admin_listen} is not a loopback address; set admin-token (METER_ADMIN_TOKEN or --admin-token) "
        "or pass --admin-insecure to serve it without one"
    )


def _presented_token(header: str) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` header (the scheme is case-insensitive)."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    # aiohttp keeps undecodable header bytes as surrogates; surrogateescape gives the bytes back.
    return credentials.strip().encode("utf-8", "surrogateescape")


def _is_open(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in OPEN_PATHS


def unauthorized() -> web.Response:
    return web.Response(
        status=401,
        body=_UNAUTHORIZED_BODY,
        content_type="application/json",
        headers={"WWW-Authenticate": ADMIN_CHALLENGE},
    )


# The probes are answered whatever name they were sent to: they carry nothing.
_PROBES = frozenset({"/healthz", "/readyz"})

_MISDIRECTED_BODY = json.dumps(
    {
        "error": {
            "message": "without an admin token this port answers requests addressed to localhost or a loopback address only",
            "type": "meter_admin_error",
            "code": "not_a_loopback_host",
            "param": None,
        }
    }
).encode()


def host_name(host_header: str) -> str:
    """The name or address of a Host header, without its port (`[::1]:9464` is `::1`)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def loopback_hosts_only() -> Any:
    """Middleware for an admin port on loopback without a token: a request addressed to
    any other name is refused (403).  A web page can have its own name resolve to
    127.0.0.1 (DNS rebinding) and read this port as its own origin; the browser still
    sends the page's name as Host, which is how it is told apart.  With a token there
    is no need: a browser never sends one by itself."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None or request.path in _PROBES or is_loopback_host(host_name(host)):
            return await handler(request)
        return web.Response(status=403, body=_MISDIRECTED_BODY, content_type="application/json")

    return guard


_CROSS_SITE_BODY = json.dumps(
    {
        "error": {
            "message": "without an admin token this port answers no request a browser sent from another origin",
            "type": "meter_admin_error",
            "code": "cross_site_request",
            "param": None,
        }
    }
).encode()

# Sec-Fetch-Site values of a request the console's own page made, or that a person typed.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def _cross_site(request: web.Request) -> bool:
    """True when a browser says the request came from another origin's page: its
    Sec-Fetch-Site, or an Origin that is not the address it was sent to."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.lower() not in _OWN_FETCH_SITES:
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    _, _, netloc = origin.partition("://")
    return netloc.lower() != request.headers.get("Host", "").lower()


def same_origin_only() -> Any:
    """Middleware for an admin port without a token: a request a browser sent for another
    origin's page is refused (403), but for the probes and the console's page and files.
    A page the operator opens can address 127.0.0.1 directly: a form's POST or a no-cors
    fetch needs no preflight, so `/api/sql` ran its statement (the page sees how long it
    took) and every report forced a flush and a full aggregate.  Clients that are no
    browser send neither header; with a token there is no need (no browser sends it)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_open(request) or not _cross_site(request):
            return await handler(request)
        return web.Response(status=403, body=_CROSS_SITE_BODY, content_type="application/json")

    return guard


def bearer_auth(token: str) -> Any:
    """Middleware: `Authorization: Bearer <token>` on every admin path but the probes."""
    expected = token.encode("utf-8")

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_open(request):
            return await handler(request)
        presented = _presented_token(request.headers.get("Authorization", ""))
        # compare_digest even for a missing token, so timing says nothing about which check failed.
        if not hmac.compare_digest(presented or b"", expected) or presented is None:
            return unauthorized()
        return await handler(request)

    return guard
