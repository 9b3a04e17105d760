"""The HTTP requests meter's commands send with a credential: never redirected.

`meter report|sql|budgets --url` send METER_ADMIN_TOKEN, and `meter reconcile`
(and `meter serve --reconcile-every`) the provider's admin key, in an
Authorization header.  urllib's default opener follows a redirect to any host
and sends that header again there, so whoever answers for the address given
could hand the credential to a host of their choosing.  `fetch` refuses every
redirect instead (`RedirectRefused`), and turns what http.client raises outside
`OSError` (a malformed address, a broken answer) into `URLError`, so that a
caller's one `except URLError` covers every way the server cannot be read.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from typing import IO, NoReturn


class RedirectRefused(Exception):
    """The server answered with a redirect; the text names the status, never the Location."""

    def __init__(self, status: int) -> None:
        super().__init__(f"answered HTTP {status} (a redirect); meter does not follow redirects")
        self.status = status


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # Every status urllib would follow, refused before any new request is built:
    # nothing is sent anywhere a second time.
    def http_error_302(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: http.client.HTTPMessage) -> NoReturn:
        fp.close()
        raise RedirectRefused(code)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def fetch(
    request: urllib.request.Request, timeout: float, *, max_bytes: int | None = None, within: float | None = None
) -> tuple[bytes, http.client.HTTPMessage]:
    """The answer's body and headers.  Raises `RedirectRefused` on a redirect,
    `HTTPError` on any other status from 400 on, `URLError` when the server
    cannot be reached or read.

    `timeout` bounds each wait on the socket; an answer read in the process that
    serves (`--reconcile-every`) may also have its body bounded in size
    (`max_bytes`) and in time (`within` seconds, from the request): a server that
    trickles a body a byte a little inside `timeout`, or sends one without end, is
    then a `URLError` too.  The status line and headers are http.client's to read,
    under `timeout` alone."""
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            if max_bytes is None and within is None:
                return answer.read(), answer.headers
            return _read_bounded(answer, max_bytes, time.monotonic() + within if within is not None else None), answer.headers
    except http.client.HTTPException as exc:  # InvalidURL, BadStatusLine, IncompleteRead: not OSErrors
        raise urllib.error.URLError(_one_line(exc)) from None


def _read_bounded(answer: http.client.HTTPResponse, max_bytes: int | None, deadline: float | None) -> bytes:
    # read1: what one read of the socket gives, so that the bounds are checked as the
    # bytes come, not once a large read has waited for all of them.
    parts: list[bytes] = []
    size = 0
    while chunk := answer.read1(1 << 16):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise urllib.error.URLError(f"its answer is larger than {max_bytes >> 20} MiB")
        if deadline is not None and time.monotonic() > deadline:
            raise urllib.error.URLError("its answer took too long to arrive")
        parts.append(chunk)
    return b"".join(parts)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
