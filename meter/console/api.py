"""The console's routes: the page, its static files, and the latest requests as JSON.

- `GET /` is `static/index.html` with one attribute filled in: whether the admin
  port wants a token, so the page shows its sign-in form before it asks for
  data (never a 401 just to find out).
- `GET /console/<file>` serves the page's script and style from the package;
  only the files in `STATIC_FILES` exist (no path from the request reaches the
  file system).
- `GET /api/requests?since=&until=&where=&limit=` lists the newest rows that a
  report with the same arguments would sum (`meter.report.query.filter_sql`),
  newest first, at most `MAX_LIMIT`.  Records still queued in the ledger writer
  are written first, as for `/api/report`.  Keys are named as a report names
  them; a raw key is never in the ledger, so never here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from decimal import Decimal
from importlib import resources
from typing import Any

from aiohttp import web

from ..ledger import LedgerNotOpen, LedgerUnavailable
from ..report import ReportAPI
from ..report.api import written_first
from ..report.query import NANO, filter_sql, key_label, one_line, stored_key_names
from ..report.window import ReportArgs, ReportError, parse_args

log = logging.getLogger("meter.console")

# name -> content type; the only files under /console/.
STATIC_FILES = {
    "app.js": "text/javascript",
    "chart.js": "text/javascript",
    "style.css": "text/css",
}
# The paths that load without the admin token: the page and its files hold no data.
PAGE_PATHS = frozenset({"/", *(f"/console/{name}" for name in STATIC_FILES)})

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

_REQUEST_COLUMNS = (
    "started_at, key_id, key_hint, COALESCE(model, model_requested) AS model, service_tier, endpoint, "
    "status_code, outcome, error_type, input_tokens, cached_tokens, output_tokens, reasoning_tokens, cost_usd, "
    "ttft_ms, duration_ms"
)


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.quantize(NANO), "f")  # exact, as the report writes it (here as a string)
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return value


class Console:
    """The console's admin routes over the report API's store, writer and key names."""

    def __init__(self, report_api: ReportAPI, token_required: bool) -> None:
        self.report_api = report_api
        # Read once: the package's files do not change while meter runs.
        self.index = _read("index.html").replace(b'data-auth=""', b'data-auth="' + (b"token" if token_required else b"open") + b'"')
        self.files = {name: _read(name) for name in STATIC_FILES}

    def admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.handle_index)
        for name in STATIC_FILES:
            app.router.add_get(f"/console/{name}", self.handle_static)
        app.router.add_get("/api/requests", self.handle_requests)

    async def handle_index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.index, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def handle_static(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        return web.Response(body=self.files[name], content_type=STATIC_FILES[name], charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def handle_requests(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            args = parse_args(None, q.get("since") or None, q.get("until") or None, q.getall("where", []))
            limit = int(q.get("limit") or DEFAULT_LIMIT)
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError
        except ReportError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except ValueError:
            return web.json_response({"error": f"limit: expected a whole number from 1 to {MAX_LIMIT}"}, status=400)
        api = self.report_api
        loop = asyncio.get_running_loop()
        try:
            await written_first(api.ledger_writer)
            rows = await loop.run_in_executor(None, self.latest, args.since, args.until, args.where, limit)
        except LedgerNotOpen:
            return web.json_response({"error": "the ledger is not open yet; try again"}, status=503)
        except Exception as exc:  # noqa: BLE001 - one line to the caller and the log, never a traceback page
            unavailable = isinstance(exc, LedgerUnavailable)
            log.warning("latest requests failed: %s: %s", type(exc).__name__, one_line(exc))
            what = "the ledger cannot be read now" if unavailable else "latest requests failed"
            return web.json_response({"error": f"{what}: {type(exc).__name__}: {one_line(exc)}"}, status=503 if unavailable else 500)
        return web.Response(text=json.dumps(rows), content_type="application/json")

    def latest(self, since: dt.datetime | None, until: dt.datetime | None, where: Any, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` rows a report with this window and these filters sums."""
        api = self.report_api
        condition, params = filter_sql(api.store.dialect, since, until, where, api.key_names)
        sql = f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE {condition} ORDER BY started_at DESC LIMIT {int(limit)}"
        names, raw = api.store.query(sql, params)
        # Each key under the name a report gives it over the same rows (its newest stored
        # name), not the name stored on each row: a key renamed while it was used is one name.
        kid_at = names.index("key_id")
        shown = [values[kid_at] for values in raw if values[kid_at] is not None]
        window = ReportArgs(since=since, until=until, where=list(where))
        stored = stored_key_names(api.store, window, api.key_names, only=shown) if shown else {}
        out: list[dict[str, Any]] = []
        for values in raw:
            row = dict(zip(names, values))
            kid = row.pop("key_id")
            row = {"key": key_label(kid, api.key_names, stored), "key_hint": row.pop("key_hint"), **row}
            out.append({k: _json_value(v) for k, v in row.items()})
        return out
