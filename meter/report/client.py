"""`meter report --url`: the report of a running meter, asked over its admin API.

A running meter holds its DuckDB file open, so its report is asked for at
`GET /api/report` on the admin address.  The request carries
`Authorization: Bearer $METER_ADMIN_TOKEN` when that variable is set and the
address asked for it as meter's admin API does (a 401 with its challenge, to a
first request without it): an `--url` given the proxy's port instead would
forward the token to the upstream.  A 401 is one line naming the variable.  When the meter answers `Meter-Report-Pending: N` (records
it has not yet written: the ledger is failing or behind), the caller gets N to
warn with; the rows are the same objects a `--ledger` report gives.  A
redirect is refused, never followed (`meter.outbound`): the token goes to the
address given and nowhere else.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from ..config import ADMIN_CHALLENGE, clean_admin_token
from ..outbound import RedirectRefused, fetch
from .render import parse_json_rows
from .window import ReportArgs, ReportError

ADMIN_TOKEN_ENV = "METER_ADMIN_TOKEN"
PENDING_HEADER = "Meter-Report-Pending"


def admin_headers() -> dict[str, str]:
    """Headers for a request to a meter's admin API: the bearer token from METER_ADMIN_TOKEN, if set."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        return {}
    try:
        # As meter serve reads it: a file's line break is no part of it (urllib refused the
        # header with a traceback that printed the token).
        token = clean_admin_token(token)
    except ValueError as exc:
        raise ReportError(f"{ADMIN_TOKEN_ENV}: {exc}") from None
    return {"Authorization": f"Bearer {token}"}


def _token_for(base: str, timeout: float) -> dict[str, str]:
    """`admin_headers()` for an address that asks for the token as meter's admin API does,
    else none: the token goes nowhere else (the proxy's port forwards to the upstream)."""
    headers = admin_headers()
    if not headers:
        return {}
    # Asked each time, not remembered: what answers at an address can change between two calls.
    return headers if _asks_for_the_token(base, timeout) else {}


def _asks_for_the_token(base: str, timeout: float) -> bool:
    """Whether `GET /api/budgets` at `base`, sent without the token, is answered 401 with
    meter's admin challenge.  Any other answer: no token is sent, and the request itself
    says what is wrong (an admin API without a token answers it; anything else is not one)."""
    request = urllib.request.Request(admin_endpoint(base, "/api/budgets"), method="GET")
    try:
        fetch(request, timeout)
    except urllib.error.HTTPError as exc:
        return exc.code == 401 and exc.headers.get("WWW-Authenticate", "").strip() == ADMIN_CHALLENGE
    except (RedirectRefused, urllib.error.URLError, OSError):
        return False
    return False


def admin_endpoint(base: str, path: str) -> str:
    """The URL of `path` on the admin address `base` (an `--url`).  ReportError, one
    line, when `base` is no http(s)://HOST[:PORT]: urllib would raise a bare
    ValueError or http.client's InvalidURL on it, a traceback."""
    try:
        parsed = urllib.parse.urlsplit(base)
        parsed.port  # noqa: B018 -- read for its check: ValueError on a port that is no number or out of range
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ReportError(f"--url: expected the admin address as http://HOST:PORT, got {base!r}")
    return base.rstrip("/") + path


class AdminRefused(ReportError):
    """The admin API refused the request with its own error text (HTTP 400): `detail`."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"--url: {detail}")
        self.detail = detail


def ask_admin(base: str, path: str, api: str, *, query: list[tuple[str, str]] | None = None, data: bytes | None = None,
              timeout: float) -> tuple[bytes, http.client.HTTPMessage]:
    """The body and headers of a running meter's answer at `path` (a GET, or a POST of
    JSON `data`), sent with the token where asked for it (`_token_for`) and never redirected (`meter.outbound`).
    Every failure is one line, a ReportError naming `--url`: a malformed address, a
    redirect, a 401 (naming METER_ADMIN_TOKEN), no `api` API there (404, 405), the
    meter's own error text (`AdminRefused` for a 400), or an address it cannot reach."""
    url = admin_endpoint(base, path) + ("?" + urllib.parse.urlencode(query) if query else "")
    token = _token_for(base, timeout)
    headers = {**token, "Content-Type": "application/json"} if data is not None else token
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        return fetch(request, timeout)
    except RedirectRefused as exc:
        raise ReportError(f"--url: {base} {exc}") from None
    except urllib.error.HTTPError as exc:
        if exc.code == 401 and exc.headers.get("WWW-Authenticate", "").strip() != ADMIN_CHALLENGE:
            raise ReportError(f"--url: {base} answered 401 as no meter admin API does (the proxy's address?); {ADMIN_TOKEN_ENV} was not sent") from None
        if exc.code == 401:
            given = "was refused" if token else "is not set"
            raise ReportError(f"--url: {base} answered 401: it needs its admin token, and {ADMIN_TOKEN_ENV} {given}") from None
        detail = _error_detail(exc)
        if exc.code in (404, 405) and not detail:
            raise ReportError(f"--url: {base} has no {api} API (HTTP {exc.code}); is it a meter admin address?") from None
        if exc.code == 400 and detail:
            raise AdminRefused(detail) from None
        raise ReportError(f"--url: {detail or f'HTTP {exc.code} from {base}'}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ReportError(f"--url: cannot reach {base}: {getattr(exc, 'reason', exc)}") from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The `error` text of a meter's JSON error answer, or "" for any other body."""
    try:
        detail = json.loads(exc.read().decode("utf-8")).get("error", "")
    except (OSError, http.client.HTTPException, ValueError, AttributeError):  # not JSON, not an object, or the body broke off
        return ""
    return _first_line(detail) if isinstance(detail, str) else ""


def report_query(args: ReportArgs) -> list[tuple[str, str]]:
    """The admin API's query parameters for these arguments (`where` once per condition)."""
    query: list[tuple[str, str]] = []
    if args.by:
        query.append(("by", ",".join(args.by)))
    if args.since is not None:
        query.append(("since", args.since.isoformat()))
    if args.until is not None:
        query.append(("until", args.until.isoformat()))
    query += [("where", f"{c.field}={c.value or ''}") for c in args.where]
    if args.top is not None:
        query.append(("top", str(args.top)))
    return query


def report_url(base: str, args: ReportArgs, timeout: float = 60.0, key_names: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Ask a running meter's admin API; returns the same rows as a ledger report, and the
    number of records the meter says are not yet in its ledger (None when it says none).
    With `key_names` (`--config`'s `[keys]`) the report is POSTed with them: they name
    keys over the meter's own config."""
    payload = json.dumps({"keys": dict(key_names)}).encode() if key_names else None
    raw, headers = ask_admin(base, "/api/report", "report", query=report_query(args), data=payload, timeout=timeout)
    try:
        rows = parse_json_rows(raw.decode("utf-8"))
    except ValueError:
        raise ReportError(f"--url: {base} did not answer with a report") from None
    pending_header = headers.get(PENDING_HEADER)
    pending = int(pending_header) if pending_header is not None and pending_header.strip().isdigit() else None
    return rows, pending
