"""`meter report --url`: the report of a running meter, asked over its admin API.

A running meter holds its DuckDB file open, so its report is asked for at
`GET /api/report` on the admin address.  The request carries
`Authorization: Bearer $METER_ADMIN_TOKEN` when that variable is set; a 401 is
one line naming it.  When the meter answers `Meter-Report-Pending: N` (records
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

from ..outbound import RedirectRefused, fetch
from .render import parse_json_rows
from .window import ReportArgs, ReportError

ADMIN_TOKEN_ENV = "METER_ADMIN_TOKEN"
PENDING_HEADER = "Meter-Report-Pending"


def admin_headers() -> dict[str, str]:
    """Headers for a request to a meter's admin API: the bearer token from METER_ADMIN_TOKEN, if set."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    return {"Authorization": f"Bearer {token}"} if token else {}


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


def redirect_error(base: str, exc: RedirectRefused) -> str:
    """The one line for an admin address that answered with a redirect."""
    return f"--url: {base} {exc}"


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
    query = report_query(args)
    url = admin_endpoint(base, "/api/report") + ("?" + urllib.parse.urlencode(query) if query else "")
    if key_names:
        payload = json.dumps({"keys": dict(key_names)}).encode()
        request = urllib.request.Request(url, data=payload, headers={**admin_headers(), "Content-Type": "application/json"}, method="POST")
    else:
        request = urllib.request.Request(url, headers=admin_headers())
    try:
        raw, headers = fetch(request, timeout)
    except RedirectRefused as exc:
        raise ReportError(redirect_error(base, exc)) from None
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            given = "was refused" if admin_headers() else "is not set"
            raise ReportError(f"--url: {base} answered 401: it needs its admin token, and {ADMIN_TOKEN_ENV} {given}") from None
        detail = _error_detail(exc)
        if exc.code == 404 and not detail:
            raise ReportError(f"--url: {base} has no report API (HTTP 404); is it a meter admin address?") from None
        raise ReportError(f"--url: {detail or f'HTTP {exc.code} from {base}'}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReportError(f"--url: cannot reach {base}: {reason}") from None
    try:
        rows = parse_json_rows(raw.decode("utf-8"))
    except ValueError:
        raise ReportError(f"--url: {base} did not answer with a report") from None
    pending_header = headers.get(PENDING_HEADER)
    pending = int(pending_header) if pending_header is not None and pending_header.strip().isdigit() else None
    return rows, pending
