"""`GET /api/report?by=...&since=...&until=...&where=...&top=...` on the admin port.

Answers with the JSON that `meter report --format json` prints, read through
the store `meter serve` writes with (the DuckDB file is held open by that
meter, so this is how its report is read live; a PostgreSQL store reads on a
connection of its own, so a long report never holds up the writer).  Records
still queued in the ledger writer are written first (waiting at most
`flush_wait`: ten flush intervals, 1 to 5 s), so the report covers every
request that has finished; when some
are still not in the ledger (it is failing or slow), the answer says how many
in `Meter-Report-Pending`.  The query runs in a worker thread; the event loop
never waits on it.  Keys are named from this meter's own config (`[keys]`), the
config in force where the requests are served.

Errors are one line: a bad argument is a 400 (the CLI's own message), a store
that cannot answer now (`meter.ledger.LedgerUnavailable`) a 503, anything else
a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from ..config import SettingError, Settings, keys_from_toml
from ..ledger import LedgerNotOpen, LedgerUnavailable, Store
from .client import PENDING_HEADER
from .query import one_line, report
from .render import render_json
from .window import ReportError, parse_args

if TYPE_CHECKING:
    from aiohttp import web

    from ..ledger import LedgerWriter

log = logging.getLogger("meter.report")

# How long a report waits for queued records to reach the ledger before it answers
# with what is there (and says what is not): ten of the writer's flush intervals,
# between FLUSH_WAIT_MIN and FLUSH_WAIT.  The flush wakes the writer at once, so a
# healthy one is done within about one interval; a writer ten intervals behind is
# failing or slow, and the report says so rather than keep its caller waiting.
# The default interval (0.5 s) gives FLUSH_WAIT, 5 s; a shorter one (fresher rows)
# answers sooner when the ledger is down, and never below FLUSH_WAIT_MIN, which
# leaves a slow disk's batch room to land.
FLUSH_WAIT = 5.0
FLUSH_WAIT_MIN = 1.0
FLUSH_WAIT_INTERVALS = 10


def flush_wait(ledger_writer: LedgerWriter) -> float:
    """Seconds a report or query waits for `ledger_writer` to write what it holds."""
    return min(FLUSH_WAIT, max(FLUSH_WAIT_MIN, FLUSH_WAIT_INTERVALS * ledger_writer.flush_interval))


async def written_first(ledger_writer: LedgerWriter | None) -> None:
    """Before a read of the serving ledger: the records `ledger_writer` still holds are
    written, waiting at most `flush_wait` in a worker thread (the loop never waits)."""
    if ledger_writer is not None:
        await asyncio.get_running_loop().run_in_executor(None, ledger_writer.flush, flush_wait(ledger_writer))


def posted_key_names(body: bytes) -> dict[str, str]:
    """`{"keys": {key_id: name, ...}}`, checked as the config's `[keys]` is."""
    try:
        data = json.loads(body)  # RecursionError: nested past the reader's limit
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ReportError('keys: the body must be JSON: {"keys": {"<key_id>": "<name>", ...}}') from None
    table = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ReportError('keys: the body must be JSON: {"keys": {"<key_id>": "<name>", ...}}')
    try:
        "".join(table.values()).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's \ud800): no answer can be written with it
        raise ReportError("keys: a name is not valid Unicode (a lone surrogate)") from None
    try:
        return keys_from_toml(table)
    except SettingError as exc:
        raise ReportError(str(exc).replace("config: [keys]", "keys:", 1)) from None


class ReportAPI:
    """The admin handler of `/api/report` over the serving store and its writer."""

    def __init__(self, settings: Settings, store: Store, ledger_writer: LedgerWriter | None) -> None:
        self.store = store
        self.ledger_writer = ledger_writer
        self.key_names: dict[str, str] = dict(settings.keys)

    def admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/report", self.handle_report)
        # POST: the same report, keys named by the caller's `[keys]` over this meter's
        # (`meter report --url --config`); a body, since a config may name many keys.
        app.router.add_post("/api/report", self.handle_report)

    async def stop(self) -> None:
        """Nothing to release: the store is the server's and is closed by it."""

    async def handle_report(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        q = request.query
        try:
            args = parse_args(q.getall("by", []), q.get("since") or None, q.get("until") or None, q.getall("where", []), q.get("top"))
        except ReportError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        key_names = self.key_names
        if request.method == "POST":
            try:
                key_names = {**key_names, **posted_key_names(await request.read())}
            except ReportError as exc:
                return web.json_response({"error": str(exc)}, status=400)
        loop = asyncio.get_running_loop()
        try:
            await written_first(self.ledger_writer)
            rows = await loop.run_in_executor(None, report, self.store, args, key_names)
        except LedgerNotOpen:
            return web.json_response({"error": "the ledger is not open yet; try again"}, status=503)
        except Exception as exc:  # any failure is one line to the caller and the log, never a traceback page
            # The store's own text (host, database, never the password: the stores
            # redact it) goes only behind the admin token.
            unavailable = isinstance(exc, LedgerUnavailable)
            log.warning("report failed: %s: %s", type(exc).__name__, one_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            what = "the ledger cannot be read now" if unavailable else "report failed"
            return web.json_response({"error": f"{what}: {type(exc).__name__}: {one_line(exc)}"}, status=503 if unavailable else 500)
        headers = {}
        pending = self.unwritten()
        if pending is not None:
            headers[PENDING_HEADER] = str(pending)
        return web.Response(text=render_json(rows), content_type="application/json", headers=headers)

    def unwritten(self) -> int | None:
        """Records that finished but are not in the ledger (None when the report can see
        every one): still queued after the flush, in the spool, or the ledger failing."""
        writer = self.ledger_writer
        if writer is None:
            return None
        pending = int(writer.unwritten)
        if pending > 0 or not writer.stats.healthy:
            return pending
        return None
