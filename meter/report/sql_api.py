"""`POST /api/sql` on the admin port: `meter sql --url`, a read-only query of the live ledger.

The body is `{"sql": "SELECT ...", "limit": N, "timeout": S}` (limit and timeout
optional, at most `MAX_LIMIT` rows and `MAX_TIMEOUT` seconds); the answer is
`meter.report.sql_render.answer_json`.  Behind the admin token like every admin
path.  A DuckDB ledger is asked in the ledger process that holds the file, on
its confined database (`meter.ledger.sql`); a PostgreSQL ledger on a
connection of its own in a READ ONLY transaction.  Records still queued in the
ledger writer are written first (at most `meter.report.api.flush_wait`), as for
`/api/report`.

Errors are one line in `{"error": ...}`: 400 for bad SQL or a refused
statement (the database's first line), 503 when the ledger cannot answer now.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from ..ledger import LedgerUnavailable, Store
from ..ledger.sql import DEFAULT_LIMIT, DEFAULT_TIMEOUT, SqlError, SqlResult, first_line, postgres_sql
from .api import written_first
from .sql_render import answer_json

if TYPE_CHECKING:
    from aiohttp import web

    from ..ledger import LedgerWriter

log = logging.getLogger("meter.report")

MAX_LIMIT = 1_000_000
MAX_TIMEOUT = 300.0
MAX_BODY = 1024 * 1024


class SqlAPI:
    """The admin handler of `/api/sql` over the serving store."""

    def __init__(self, store: Store, ledger_writer: LedgerWriter | None) -> None:
        self.store = store
        self.ledger_writer = ledger_writer

    def admin_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/sql", self.handle_sql)

    def run(self, sql: str, limit: int, timeout: float) -> SqlResult:
        store: Any = self.store
        if store.dialect == "postgresql":
            return postgres_sql(store.url, sql, limit, timeout)
        result: SqlResult = store.sql(sql, limit, timeout)
        return result

    async def handle_sql(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        def error(status: int, message: str) -> web.Response:
            return web.json_response({"error": message}, status=status)

        if request.content_length is not None and request.content_length > MAX_BODY:
            return error(400, f"the body is over {MAX_BODY} bytes")
        try:
            body = json.loads(await request.content.read(MAX_BODY + 1))
            sql = body["sql"]
            limit = int(body.get("limit") or DEFAULT_LIMIT)
            timeout = float(body.get("timeout") or DEFAULT_TIMEOUT)
            if not isinstance(sql, str) or not sql.strip():
                raise ValueError("sql must be a non-empty string")
            sql.encode("utf-8")  # UnicodeEncodeError for a lone surrogate, which no store takes
            if not 0 < limit <= MAX_LIMIT or not 0 < timeout <= MAX_TIMEOUT:
                raise ValueError(f"limit is 1..{MAX_LIMIT}, timeout 0..{MAX_TIMEOUT:g} seconds")
        # OverflowError: an infinite limit (1e400) to int(); RecursionError: a body nested too deep.
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
            return error(400, f'expected a JSON body {{"sql": "SELECT ...", "limit": N, "timeout": S}}: {first_line(exc)}')
        loop = asyncio.get_running_loop()
        try:
            await written_first(self.ledger_writer)
            result = await loop.run_in_executor(None, self.run, sql, limit, timeout)
            answer = answer_json(result)  # in here: a value it cannot write is one line too, not a traceback page
        except SqlError as exc:
            return error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 -- one line to the caller and the log, never a traceback page
            unavailable = isinstance(exc, (LedgerUnavailable, OSError)) or type(exc).__module__.startswith("asyncpg")
            log.warning("sql failed: %s: %s", type(exc).__name__, first_line(exc))
            what = "the ledger cannot be read now" if unavailable else "sql failed"
            return error(503 if unavailable else 500, f"{what}: {type(exc).__name__}: {first_line(exc)}")
        return web.Response(text=answer, content_type="application/json")
