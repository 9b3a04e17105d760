"""`meter sql "SELECT ..."`: a read-only query of the ledger, printed as a table, CSV or JSON.

Where it runs:

- `--url http://ADMIN`: a running meter's `POST /api/sql` (its DuckDB file is
  held open; sends METER_ADMIN_TOKEN as a bearer token when set, like `meter
  report --url`; a redirect is refused, never followed);
- `--ledger PATH`, or the configured ledger (`--config`): DuckDB files are
  attached read-only to an in-memory database confined before the query runs
  (`meter.ledger.sql.confine_duckdb`; a file a running meter holds is refused
  with a hint to use `--url`), a `postgresql://` URL is asked directly in a READ
  ONLY transaction.

At most `--limit` rows (default 10,000) are printed; when some are left off a
warning says so on stderr, stdout keeps its shape.  Every failure is one line
and exit status 2: bad SQL or a refused statement gives the database's own
first line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..command import CommandError
from ..config import load_settings, redact_url
from ..ledger import LedgerReadError, is_postgres_url, open_reader
from ..ledger.sql import DEFAULT_LIMIT, DEFAULT_TIMEOUT, SqlError, SqlResult, confine_duckdb, duckdb_sql, first_line, postgres_sql
from .client import AdminRefused, ask_admin
from .sql_render import as_objects, parse_answer, render_sql
from .window import ReportError


def sql_ledgers(ledgers: list[str], sql: str, limit: int, timeout: float) -> SqlResult:
    """The query over `--ledger` values: DuckDB files read as one, or one PostgreSQL URL."""
    if len(ledgers) == 1 and is_postgres_url(ledgers[0]):
        try:
            return postgres_sql(ledgers[0], sql, limit, timeout)
        except SqlError:
            raise
        except Exception as exc:  # noqa: BLE001 -- whatever the driver raises is one line, never a traceback
            raise CommandError(f"ledger: cannot query {redact_url(ledgers[0])}: {first_line(exc)}") from None
    try:
        store: Any = open_reader(ledgers)
    except LedgerReadError as exc:
        raise CommandError(str(exc)) from None
    try:
        confine_duckdb(store.con)
        return duckdb_sql(store.con, sql, limit, timeout)
    except SqlError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CommandError(f"ledger: cannot query {', '.join(ledgers)}: {first_line(exc)}") from None
    finally:
        store.close()


def sql_url(base: str, sql: str, limit: int, timeout: float) -> tuple[list[str], list[dict[str, Any]], str | None]:
    """Ask a running meter's `POST /api/sql`."""
    body = json.dumps({"sql": sql, "limit": limit, "timeout": timeout}).encode()
    try:
        raw, _ = ask_admin(base, "/api/sql", "SQL", data=body, timeout=timeout + 30)
    except AdminRefused as exc:
        raise SqlError(exc.detail) from None  # the statement's own error, as from a ledger
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    try:
        return parse_answer(raw.decode("utf-8"))
    except ValueError:
        raise CommandError(f"--url: {base} did not answer with a query result") from None


def run_sql(args: argparse.Namespace) -> int:
    limit, timeout = args.limit, args.timeout
    if limit < 1 or timeout <= 0:
        raise CommandError("sql: --limit must be at least 1 and --timeout above 0")
    if args.url and args.config:
        # never silently ignored: the running meter queries its own ledger
        raise CommandError("sql: --config does not apply with --url: the running meter queries the ledger of its own config")
    try:
        if args.url:
            columns, rows, truncated = sql_url(args.url, args.sql, limit, timeout)
        else:
            ledgers = args.ledger or [load_settings({"config": args.config}).ledger]
            result = sql_ledgers(ledgers, args.sql, limit, timeout)
            (columns, rows), truncated = as_objects(result), result.truncated
    except SqlError as exc:
        raise CommandError(f"sql: {exc}") from None
    sys.stdout.write(render_sql(columns, rows, args.format))
    if truncated:
        why = f"the first {len(rows)} rows (--limit {limit})" if truncated == "rows" else f"the first {len(rows)} rows (the answer's size limit)"
        print(f"meter: warning: the answer has more rows; printed {why}", file=sys.stderr)
    return 0


def add_sql_command(subparsers: Any) -> None:
    """Called by `meter.cli.build_parser`: adds `sql`."""
    cmd = subparsers.add_parser(
        "sql",
        help="run one read-only SELECT over the ledger",
        description=(
            "Run one read-only SELECT over the ledger (tables requests, usage_claims, alert_claims) and print its rows. "
            "Nothing outside the ledger is reachable: no files, extensions, ATTACH, settings or second statement."
        ),
    )
    cmd.add_argument("sql", metavar="SQL", help='one SELECT statement, e.g. "SELECT model, count(*) FROM requests GROUP BY ALL"')
    source = cmd.add_mutually_exclusive_group()
    source.add_argument("--ledger", action="append", metavar="PATH_OR_URL", help="DuckDB file (not open in a running meter; repeat for several as one) or postgresql:// URL (env METER_LEDGER; default: the configured ledger)")
    source.add_argument("--url", metavar="http://ADMIN", help="ask a running meter's admin address; sends METER_ADMIN_TOKEN as a bearer token when set")
    cmd.add_argument("--config", help="TOML config whose ledger is queried when neither --ledger nor --url is given (env METER_CONFIG); not with --url")
    cmd.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    cmd.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N", help=f"print at most N rows (default {DEFAULT_LIMIT})")
    cmd.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"stop the query after this long (default {DEFAULT_TIMEOUT:g})")
    cmd.set_defaults(handler=run_sql)
