"""Reports and repricing over the ledger (SPEC §5, §8).

`meter report` sums the `requests` table by any of key, model, tier, endpoint,
project, user, day and hour, over a window, from

- one or more DuckDB files (`--ledger`, repeatable: each file is attached
  read-only to one in-memory DuckDB and their rows are read as one with
  UNION ALL, so the replicas of a fleet report as one),
- a PostgreSQL ledger (`--ledger postgresql://...`), or
- a running meter's admin API (`--url http://ADMIN`, `GET /api/report`), since
  a running meter holds its DuckDB file open.  The request carries
  `Authorization: Bearer $METER_ADMIN_TOKEN` when that variable is set; a 401
  is one line naming it.  When the meter answers `Meter-Report-Pending: N`
  (records it has not yet written: the ledger is failing or behind), the CLI
  prints one warning line on stderr; stdout keeps its shape.  A `--ledger`
  report warns the same way when the ledger's spool still holds records a
  meter could not write (they are replayed at its next start).

One query builder, `report_sql(dialect, by, since, until)`, serves every path;
the dialect switch covers the few places DuckDB and PostgreSQL differ
(formatting a timestamp as a UTC day or hour).  Rows come back as plain dicts
in one fixed column order; `render_json` is the one JSON form, printed by the
CLI and served by the admin API alike, so `--url` and `--ledger` give the very
same objects.

Output decisions:
- `key` is the name the config gives the key_id (the reporting side's config,
  else the name stored in the row), else the key_id; `key_hint` sits beside it.
  Rows are per key_id, so two keys given one name stay two rows (told apart by
  their hints).
- `model` is the model that served the request, else the one asked for (as in
  the metrics); `tier` is the tier that served it.
- `day` is `YYYY-MM-DD` and `hour` `YYYY-MM-DDTHH:00:00Z`, both in UTC.
- token columns are sums of the known values (0 when none is known);
  `unpriced_requests` counts rows with usage but no cost; `unmetered_requests`
  rows of model calls whose usage meter could not read (error_type
  `unmetered`); `errors` counts rows
  whose outcome is neither `completed` nor `in_progress`.
- `cost_usd` is exact: in JSON a number with exactly 9 decimals (the ledger's
  DECIMAL(18,9), written from the decimal, never through a float), in CSV the
  same digits, in the table trimmed to at most 9 places.
- `--since` is inclusive and `--until` exclusive; a bare date given to
  `--until` means the end of that day.  Times without an offset are UTC.
  A window reaching past 0001-01-01 or 9999-12-31 UTC is an argument error
  (the admin API's 400), not an overflow.

`meter reprice` recomputes `cost_usd` from the stored usage with today's
prices and config (the proxy's own `Pricer` and usage invariants: a row that
breaks one stays unpriced), streams the rows in Arrow batches, and rewrites
only the rows whose cost changed (NULL <-> value included) with one UPDATE
joined to an Arrow table of (id, cost) -- about 5 s per million rows.  It
prints `repriced N of M rows; cost +$X` (M: rows with usage in the window);
`--dry-run` says the same without writing.  A DuckDB file open in a running
meter is refused (stop it first); a PostgreSQL ledger can be repriced live.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import importlib.util
import io
import json
import logging
import os
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

log = logging.getLogger("meter.report")

UTC = dt.UTC
NANO = Decimal("0.000000001")

GROUP_FIELDS = ("key", "model", "tier", "endpoint", "project", "user", "day", "hour")
METRIC_COLUMNS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "web_search_calls",
    "cost_usd",
    "unpriced_requests",
    "unmetered_requests",
    "errors",
)
TOKEN_COLUMNS = METRIC_COLUMNS[1:7]
OK_OUTCOMES = ("completed", "in_progress")
DIALECTS = ("duckdb", "postgresql")  # "postgres" is accepted as an alias

# The columns a report reads; several files are unioned on exactly these.
REPORT_SOURCE_COLUMNS = (
    "started_at",
    "endpoint",
    "outcome",
    "model_requested",
    "model",
    "service_tier",
    *TOKEN_COLUMNS,
    "total_tokens",
    "cost_usd",
    "key_id",
    "key_hint",
    "key_name",
    "project",
    "user_id",
    "error_type",
)


class ReportError(ValueError):
    """Bad report arguments; one line, naming the argument."""


# --- arguments -------------------------------------------------------------------

_SPAN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_SPAN_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_when(value: str, *, name: str = "--since", end_of_day: bool = False, now: dt.datetime | None = None) -> dt.datetime:
    """An aware UTC datetime from an ISO date/time or a span back from now (`7d`, `24h`, `30m`).

    A bare date is midnight UTC, or with `end_of_day` the next midnight (so
    `--until 2026-05-31` includes that day).  A time without an offset is UTC.
    Anything that leaves 0001-01-01..9999-12-31 UTC (a huge span, an offset
    across either end) is a `ReportError`, never an OverflowError.
    """
    text = value.strip()
    now = now or dt.datetime.now(UTC)
    try:
        span = _SPAN.match(text)
        if span:
            return now - dt.timedelta(**{_SPAN_UNITS[span.group(2).lower()]: int(span.group(1))})
        try:
            if _DATE.match(text):
                day = dt.date.fromisoformat(text)
                when = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
                return when + dt.timedelta(days=1) if end_of_day else when
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ReportError(
                f"{name}: cannot read {value!r}; expected an ISO date or time (2026-05-01, 2026-05-01T12:00Z) or a span back from now (7d, 24h, 30m)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC)
    except ReportError:
        raise
    except (OverflowError, ValueError):
        # timedelta and datetime arithmetic past year 1 or 9999 (OverflowError; a few
        # spans raise ValueError for a C int overflow).
        raise ReportError(f"{name}: {value!r} is out of range; times run from 0001-01-01 to 9999-12-31 UTC") from None


def parse_window(since: str | None, until: str | None, now: dt.datetime | None = None) -> tuple[dt.datetime | None, dt.datetime | None]:
    now = now or dt.datetime.now(UTC)
    start = parse_when(since, name="--since", now=now) if since else None
    end = parse_when(until, name="--until", end_of_day=True, now=now) if until else None
    if start is not None and end is not None and start >= end:
        raise ReportError(f"--since ({start.isoformat()}) is not before --until ({end.isoformat()})")
    return start, end


def parse_by(values: str | Iterable[str] | None) -> list[str]:
    """`key,model` (or several such values) -> ['key', 'model']; unknown names are an error."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in GROUP_FIELDS:
                raise ReportError(f"--by: unknown field {part.strip()!r}; choose from {', '.join(GROUP_FIELDS)}")
            if name not in out:
                out.append(name)
    return out


def output_columns(by: Sequence[str]) -> list[str]:
    """The exact keys of a report row, in order."""
    cols: list[str] = []
    for name in by:
        cols.append(name)
        if name == "key":
            cols.append("key_hint")
    return cols + list(METRIC_COLUMNS)


# --- SQL -------------------------------------------------------------------------


def _dialect(dialect: str) -> str:
    name = "postgresql" if dialect == "postgres" else dialect
    if name not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; expected one of {DIALECTS}")
    return name


def _group_exprs(dialect: str) -> dict[str, str]:
    if _dialect(dialect) == "duckdb":
        day = "strftime(started_at AT TIME ZONE 'UTC', '%Y-%m-%d')"
        hour = "strftime(started_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:00:00Z')"
    else:
        day = "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        hour = "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":00:00Z\"')"
    return {
        "model": "COALESCE(model, model_requested)",
        "tier": "service_tier",
        "endpoint": "endpoint",
        "project": "project",
        "user": "user_id",
        "day": day,
        "hour": hour,
    }


def report_sql(
    dialect: str,
    by: Sequence[str],
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    *,
    source: str = "requests",
) -> tuple[str, list[Any]]:
    """The report query and its parameters (`$1`, `$2`: DuckDB and asyncpg both take them).

    `key` selects `key_id`, `key_hint` and the stored `key_name` (`report_key`);
    every other field selects itself under its own name.  `source` is a table
    name or a parenthesised subquery with the `REPORT_SOURCE_COLUMNS`.
    """
    exprs = _group_exprs(dialect)
    select: list[str] = []
    group: list[str] = []
    order: list[str] = []
    for name in by:
        if name == "key":
            select += ["key_id AS key_id", "key_hint AS key_hint", "max(key_name) AS key_name"]
            group += ["key_id", "key_hint"]
            order += ["key_id", "key_hint"]
        elif name in exprs:
            select.append(f'{exprs[name]} AS "{name}"')
            group.append(exprs[name])
            order.append(exprs[name])
        else:
            raise ReportError(f"--by: unknown field {name!r}; choose from {', '.join(GROUP_FIELDS)}")
    has_usage = "(input_tokens IS NOT NULL OR output_tokens IS NOT NULL OR total_tokens IS NOT NULL)"
    select.append("count(*) AS requests")
    select += [f"COALESCE(sum({col}), 0) AS {col}" for col in TOKEN_COLUMNS]
    select.append("COALESCE(sum(cost_usd), 0) AS cost_usd")
    select.append(f"count(*) FILTER (WHERE cost_usd IS NULL AND {has_usage}) AS unpriced_requests")
    select.append("count(*) FILTER (WHERE error_type = 'unmetered') AS unmetered_requests")
    ok = ", ".join(f"'{o}'" for o in OK_OUTCOMES)
    select.append(f"count(*) FILTER (WHERE outcome IS NULL OR outcome NOT IN ({ok})) AS errors")
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        params.append(since)
        where.append(f"started_at >= ${len(params)}")
    if until is not None:
        params.append(until)
        where.append(f"started_at < ${len(params)}")
    sql = "SELECT " + ", ".join(select) + f" FROM {source}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if group:
        sql += " GROUP BY " + ", ".join(group)
        sql += " ORDER BY " + ", ".join(f"{o} NULLS LAST" for o in order)
    return sql, params


def union_source(aliases: Sequence[str]) -> str:
    """One relation over the `requests` tables of several attached databases."""
    cols = ", ".join(REPORT_SOURCE_COLUMNS)
    return "(" + " UNION ALL ".join(f"SELECT {cols} FROM {alias}.requests" for alias in aliases) + ") AS requests"


def shape_rows(raw: Iterable[Mapping[str, Any]], by: Sequence[str], key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Query rows -> report rows: exact columns, key names applied, sorted by the group fields."""
    names = key_names or {}
    out: list[dict[str, Any]] = []
    for r in raw:
        row: dict[str, Any] = {}
        for name in by:
            if name == "key":
                kid = r["key_id"]
                row["key"] = (names.get(kid) or r["key_name"] or kid) if kid is not None else None
                row["key_hint"] = r["key_hint"]
            else:
                row[name] = r[name]
        for col in METRIC_COLUMNS:
            value = r[col]
            if col == "cost_usd":
                row[col] = Decimal(value if value is not None else 0).quantize(NANO)
            else:
                row[col] = int(value or 0)
        out.append(row)

    def sort_key(row: dict[str, Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        for name in by:
            for col in (("key", "key_hint") if name == "key" else (name,)):
                value = row[col]
                parts.append((value is None, "" if value is None else str(value)))
        return tuple(parts)

    out.sort(key=sort_key)
    return out


# --- rendering -------------------------------------------------------------------


def format_cost(value: Decimal) -> str:
    """Exactly 9 decimals, no exponent: `0.001234567`, `12.500000000`."""
    return format(Decimal(value).quantize(NANO), "f")


def _json_value(value: Any) -> str:
    if isinstance(value, Decimal):
        return format_cost(value)
    return json.dumps(value, ensure_ascii=False)


def render_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list, one object per line; `cost_usd` written from the decimal, never through a float."""
    if not rows:
        return "[]\n"
    objects = ["{" + ", ".join(f"{json.dumps(k)}: {_json_value(v)}" for k, v in row.items()) + "}" for row in rows]
    return "[\n  " + ",\n  ".join(objects) + "\n]\n"


def parse_json_rows(text: str) -> list[dict[str, Any]]:
    """The inverse of `render_json`, keeping `cost_usd` exact."""
    rows = json.loads(text, parse_float=Decimal)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected a JSON list of objects")
    for row in rows:
        if "cost_usd" in row:
            row["cost_usd"] = Decimal(row["cost_usd"]).quantize(NANO)
    return rows


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_cost(value)
    return str(value)


def render_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    return buf.getvalue()


def _table_cost(value: Decimal) -> str:
    text = format_cost(value).rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Aligned columns; the last row is the total (without --by it is the only row)."""
    group_cols = [c for c in columns if c not in METRIC_COLUMNS]
    header = list(columns) if group_cols else ["", *columns]
    totals: dict[str, Any] = {c: (Decimal(0) if c == "cost_usd" else 0) for c in METRIC_COLUMNS}
    body: list[list[str]] = []
    for row in rows:
        for c in METRIC_COLUMNS:
            totals[c] += row[c]
        cells = [("-" if row[c] is None else str(row[c])) for c in group_cols]
        cells += [_table_cost(row[c]) if c == "cost_usd" else str(row[c]) for c in METRIC_COLUMNS]
        body.append(cells)
    total = ["total"] + [""] * (len(group_cols) - 1) if group_cols else ["total"]
    total += [_table_cost(totals[c]) if c == "cost_usd" else str(totals[c]) for c in METRIC_COLUMNS]
    if not group_cols:
        body = []  # the one row of totals is the total row
    lines = [header, *body, total]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    first_metric = len(header) - len(METRIC_COLUMNS)
    out = []
    for n, line in enumerate(lines):
        cells = [cell.rjust(w) if i >= first_metric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        if n == len(lines) - 1 and len(lines) > 1:
            out.append("  ".join("-" * w for w in widths))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def render(rows: Sequence[Mapping[str, Any]], by: Sequence[str], fmt: str) -> str:
    columns = output_columns(by)
    if fmt == "json":
        return render_json(rows)
    if fmt == "csv":
        return render_csv(rows, columns)
    return render_table(rows, columns)


# --- ledgers ---------------------------------------------------------------------


def is_postgres_url(ledger: str) -> bool:
    return ledger.startswith(("postgresql://", "postgres://"))


def _require_pg(what: str) -> None:
    if importlib.util.find_spec("meter.ledger_pg") is None:
        raise ReportError(f"{what}: PostgreSQL ledgers need meter.ledger_pg, which this installation of meter lacks")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _duckdb_error(path: str, exc: Exception, *, suggest_url: bool) -> ReportError:
    message = str(exc)
    if "lock" in message.lower():
        hint = "; ask the running meter with --url http://ADMIN instead" if suggest_url else "; stop that meter first"
        pid = re.search(r"PID (\d+)", message)
        held = f" (held by PID {pid.group(1)})" if pid else ""
        return ReportError(f"ledger: {path} is open in a running meter{held}{hint}")
    first = message.splitlines()[0] if message else type(exc).__name__
    return ReportError(f"ledger: cannot read {path}: {first}")


def open_duckdb_ledgers(paths: Sequence[str], *, read_only: bool = True, suggest_url: bool = True) -> tuple[Any, list[str]]:
    """An in-memory DuckDB with each file attached as l1, l2, ...; returns (connection, aliases)."""
    import duckdb

    unique: dict[str, str] = {}
    for path in paths:
        if not os.path.exists(path):
            raise ReportError(f"ledger: no such file: {path}")
        unique.setdefault(os.path.realpath(path), path)  # the same file twice is still one ledger
    paths = list(unique.values())
    con = duckdb.connect(":memory:")
    aliases = []
    try:
        for n, path in enumerate(paths, 1):
            alias = f"l{n}"
            mode = " (READ_ONLY)" if read_only else ""
            try:
                con.execute(f"ATTACH {_sql_string(path)} AS {alias}{mode}")
            except duckdb.Error as exc:
                raise _duckdb_error(path, exc, suggest_url=suggest_url) from None
            found = con.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE database_name = $1 AND table_name = 'requests'", [alias]
            ).fetchone()
            if not found or not found[0]:
                raise ReportError(f"ledger: {path} has no requests table (not a meter ledger?)")
            aliases.append(alias)
    except BaseException:
        con.close()
        raise
    return con, aliases


def _fetch_dicts(cursor: Any, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    res = cursor.execute(sql, list(params))
    names = [d[0] for d in res.description]
    return [dict(zip(names, row)) for row in res.fetchall()]


def report_duckdb_files(paths: Sequence[str], by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    import duckdb

    con, aliases = open_duckdb_ledgers(paths)
    try:
        sql, params = report_sql("duckdb", by, since, until, source=union_source(aliases))
        try:
            raw = _fetch_dicts(con, sql, params)
        except duckdb.Error as exc:
            raise ReportError(f"ledger: cannot report over {', '.join(paths)}: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    return shape_rows(raw, by, key_names)


def report_duckdb_cursor(cursor: Any, by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    sql, params = report_sql("duckdb", by, since, until)
    return shape_rows(_fetch_dicts(cursor, sql, params), by, key_names)


def open_postgres_ledger(url: str) -> Any:
    """A `meter.ledger_pg.PostgresStore` for reading (and repricing) an existing ledger."""
    _require_pg("--ledger")
    from .ledger_pg import PostgresStore

    return PostgresStore(url, migrate=False)


def report_store_rows(store: Any, by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """A report over a store with `query(sql, params) -> (names, rows)` (PostgreSQL)."""
    sql, params = report_sql(getattr(store, "dialect", "postgresql"), by, since, until)
    names, rows = store.query(sql, params)
    return shape_rows((dict(zip(names, row)) for row in rows), by, key_names)


def report_postgres(url: str, by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    store = open_postgres_ledger(url)
    try:
        return report_store_rows(store, by, since, until, key_names)
    except ReportError:
        raise
    except Exception as exc:
        raise ReportError(f"ledger: cannot report from {_redact(url)}: {_one_line(exc)}") from None
    finally:
        store.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(url: str) -> str:
    from .config import redact_url

    return redact_url(url)


def report_ledgers(ledgers: Sequence[str], by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    pg = [x for x in ledgers if is_postgres_url(x)]
    if pg:
        if len(ledgers) > 1:
            raise ReportError("--ledger: a PostgreSQL ledger already holds every replica's rows; give it alone")
        return report_postgres(pg[0], by, since, until, key_names)
    for x in ledgers:
        if "://" in x:
            raise ReportError(f"--ledger: a ledger is a DuckDB file or a postgresql:// URL, got {_redact(x)!r} (for a running meter use --url)")
    return report_duckdb_files(ledgers, by, since, until, key_names)


ADMIN_TOKEN_ENV = "METER_ADMIN_TOKEN"
PENDING_HEADER = "Meter-Report-Pending"


def admin_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers for a request to a meter's admin API: the bearer token from METER_ADMIN_TOKEN, if set."""
    token = (os.environ if env is None else env).get(ADMIN_TOKEN_ENV, "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def report_url(base: str, by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, timeout: float = 60.0) -> tuple[list[dict[str, Any]], int | None]:
    """Ask a running meter's admin API; returns the same rows as a ledger report, and the
    number of records the meter says are not yet in its ledger (None when it says none)."""
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ReportError(f"--url: expected the admin address as http://HOST:PORT, got {base!r}")
    query: dict[str, str] = {}
    if by:
        query["by"] = ",".join(by)
    if since is not None:
        query["since"] = since.isoformat()
    if until is not None:
        query["until"] = until.isoformat()
    url = base.rstrip("/") + "/api/report" + ("?" + urllib.parse.urlencode(query) if query else "")
    request = urllib.request.Request(url, headers=admin_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read().decode("utf-8")
            pending_header = resp.headers.get(PENDING_HEADER)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            given = "was refused" if admin_headers() else "is not set"
            raise ReportError(f"--url: {base} answered 401: it needs its admin token, and {ADMIN_TOKEN_ENV} {given}") from None
        detail = ""
        try:
            detail = json.loads(exc.read().decode("utf-8")).get("error", "")
        except Exception:
            pass
        if not isinstance(detail, str):
            detail = ""
        if exc.code == 404 and not detail:
            raise ReportError(f"--url: {base} has no report API (HTTP 404); is it a meter admin address?") from None
        raise ReportError(f"--url: {_one_line_text(detail) or f'HTTP {exc.code} from {base}'}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReportError(f"--url: cannot reach {base}: {reason}") from None
    try:
        rows = parse_json_rows(body)
    except ValueError:
        raise ReportError(f"--url: {base} did not answer with a report") from None
    pending = int(pending_header) if pending_header is not None and pending_header.strip().isdigit() else None
    return rows, pending


def _one_line_text(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# --- the admin API -----------------------------------------------------------------


class ReportAPI:
    """Addon: `GET /api/report?by=...&since=...&until=...` on the admin port.

    Answers with the JSON that `meter report --format json` prints.  Records
    still queued in the ledger writer are written first (waiting at most
    `FLUSH_WAIT`), so the report covers every request that has finished; when
    some are still not in the ledger (it is failing or slow), the answer says
    how many in `Meter-Report-Pending`.  The query runs on its own DuckDB
    cursor in a worker thread; the event loop never waits on it.
    """

    def __init__(self, settings: Any, store: Any, ledger_writer: Any) -> None:
        self.settings = settings
        self.store = store
        self.ledger_writer = ledger_writer
        self.key_names: dict[str, str] = dict(getattr(settings, "keys", {}) or {})
        self._reader: Any = None
        self._reader_lock = threading.Lock()

    async def stop(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await asyncio.get_running_loop().run_in_executor(None, reader.close)

    def admin_routes(self, app: Any) -> None:
        app.router.add_get("/api/report", self.handle_report)

    async def handle_report(self, request: Any) -> Any:
        from aiohttp import web

        q = request.query
        try:
            by = parse_by(q.getall("by", []))
            since, until = parse_window(q.get("since") or None, q.get("until") or None)
        except ReportError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        loop = asyncio.get_running_loop()
        try:
            if self.ledger_writer is not None:
                await loop.run_in_executor(None, self.ledger_writer.flush, self.FLUSH_WAIT)
            rows = await loop.run_in_executor(None, self._report, by, since, until)
        except _LedgerNotOpen:
            return web.json_response({"error": "the ledger is not open yet; try again"}, status=503)
        except Exception as exc:
            # One line, caller and log alike: the store's own text (host, database, never
            # the password: the stores redact it) goes only behind the admin token.
            unavailable = _store_unavailable(exc)
            log.warning("report failed: %s: %s", type(exc).__name__, _one_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            what = "the ledger cannot be read now" if unavailable else "report failed"
            return web.json_response({"error": f"{what}: {type(exc).__name__}: {_one_line(exc)}"}, status=503 if unavailable else 500)
        headers = {}
        pending = self.unwritten()
        if pending is not None:
            headers[PENDING_HEADER] = str(pending)
        return web.Response(text=render_json(rows), content_type="application/json", headers=headers)

    # How long a report waits for queued records to reach the ledger before it
    # answers with what is there (and says what is not).
    FLUSH_WAIT = 5.0

    def unwritten(self) -> int | None:
        """Records that finished but are not in the ledger (None when the report can see
        every one): still queued after the flush, or the ledger failing."""
        writer = self.ledger_writer
        if writer is None:
            return None
        pending = int(writer.pending)
        if pending > 0 or not writer.stats.healthy:
            return pending
        return None

    def _report(self, by: list[str], since: dt.datetime | None, until: dt.datetime | None) -> list[dict[str, Any]]:
        if getattr(self.store, "dialect", "duckdb") != "duckdb":
            # PostgreSQL: a connection of our own, so a long report never holds up the writer's.
            with self._reader_lock:
                if self._reader is None:
                    from .ledger_pg import PostgresStore

                    self._reader = PostgresStore(self.store.url, migrate=False)
                return report_store_rows(self._reader, by, since, until, self.key_names)
        if getattr(self.store, "con", None) is None:
            raise _LedgerNotOpen()
        cursor = self.store.cursor()
        try:
            return report_duckdb_cursor(cursor, by, since, until, self.key_names)
        finally:
            cursor.close()


class _LedgerNotOpen(Exception):
    pass


def _store_unavailable(exc: BaseException) -> bool:
    """A store that cannot answer now (an outage: 503), as opposed to a fault in the report (500)."""
    from .ledger_child import LedgerChildError

    outages: tuple[type[BaseException], ...] = (OSError, LedgerChildError)
    try:
        from .ledger_pg import PostgresLedgerError

        outages += (PostgresLedgerError,)
    except ImportError:  # an installation without the PostgreSQL ledger
        pass
    return isinstance(exc, outages)


# --- reprice -----------------------------------------------------------------------

# The stored columns repricing reads, in this order.
REPRICE_COLUMNS = (
    "id",
    "started_at",
    "endpoint",
    "model_requested",
    "model",
    "service_tier",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "web_search_calls",
    "cost_usd",
)
_HAS_USAGE = "(input_tokens IS NOT NULL OR output_tokens IS NOT NULL OR total_tokens IS NOT NULL)"


def reprice_select_sql(dialect: str, since: dt.datetime | None) -> tuple[str, list[Any]]:
    epoch = "epoch(started_at)" if dialect == "duckdb" else "extract(epoch FROM started_at)::float8"
    cols = [("id::VARCHAR" if dialect == "duckdb" else "id::text") + " AS id", f"{epoch} AS started_at", *REPRICE_COLUMNS[2:]]
    sql = f"SELECT {', '.join(cols)} FROM requests WHERE {_HAS_USAGE}"
    params: list[Any] = []
    if since is not None:
        params.append(since)
        sql += " AND started_at >= $1"
    return sql, params


def _as_cost(value: Any) -> Decimal | None:
    if value is None:
        return None
    return Decimal(value).quantize(NANO)


class Repricer:
    """Today's price of stored rows, through the same `Pricer` the proxy uses.

    The rule is `Pricer.price_record`'s: rows breaking a SPEC §3 invariant
    (checked again on the stored columns, with the proxy's own
    `usage_anomalies`) stay unpriced; the model is the served one, else the
    requested one; the served tier and `started_at` pick the price.  Rows are
    taken as columns (tuples in `REPRICE_COLUMNS` order), since a reprice may
    cover millions of them.
    """

    def __init__(self, pricer: Any) -> None:
        from .observe import Usage, usage_anomalies

        self.pricer = pricer
        self._usage = Usage()  # one scratch object, refilled per row
        self._anomalies = usage_anomalies

    def anomalies(self, endpoint: str | None, inp: Any, cached: Any, cache_write: Any, out: Any, reasoning: Any, total: Any) -> tuple[str, ...]:
        u = self._usage
        u.input_tokens, u.cached_tokens, u.cache_write_tokens = inp, cached, cache_write
        u.output_tokens, u.reasoning_tokens, u.total_tokens = out, reasoning, total
        return self._anomalies(u, has_output=endpoint != "embeddings")

    def cost_of(self, row: Sequence[Any]) -> Decimal | None:
        _id, started, endpoint, model_requested, model, tier, inp, cached, cw, out, reasoning, total, searches = row[:13]
        if inp is None and out is None and total is None:
            return None
        if self.anomalies(endpoint, inp, cached, cw, out, reasoning, total):
            return None
        cost = self.pricer.cost(model or model_requested, tier, float(started), inp, cached, cw, out, reasoning, searches)
        return None if cost is None else _as_cost(cost)

    def cost(self, row: Mapping[str, Any]) -> Decimal | None:
        """The same for one row given as a mapping of column names."""
        return self.cost_of([row[c] for c in REPRICE_COLUMNS])


def compute_changes(rows: Iterable[Sequence[Any]], repricer: Repricer) -> tuple[int, list[tuple[str, Decimal | None]], Decimal]:
    """(rows seen, [(id, new cost)] for rows whose cost changes, total difference); rows in `REPRICE_COLUMNS` order."""
    seen = 0
    changes: list[tuple[str, Decimal | None]] = []
    delta = Decimal(0)
    cost_of = repricer.cost_of
    for row in rows:
        seen += 1
        old = row[13]
        if old is not None:
            old = _as_cost(old)
        new = cost_of(row)
        if new != old:
            changes.append((row[0], new))
            delta += (new or 0) - (old or 0)
    return seen, changes, delta


def _arrow_batches_rows(reader: Any) -> Iterable[tuple[Any, ...]]:
    """Rows of an Arrow record batch reader as tuples, one batch in memory at a time."""
    for batch in reader:
        yield from zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)))


def reprice_duckdb(path: str, since: dt.datetime | None, repricer: Repricer, *, dry_run: bool = False) -> tuple[int, int, Decimal]:
    import duckdb
    import pyarrow as pa

    if not os.path.exists(path):
        raise ReportError(f"ledger: no such file: {path}")
    try:
        con = duckdb.connect(path, read_only=dry_run)
    except duckdb.Error as exc:
        raise _duckdb_error(path, exc, suggest_url=False) from None
    try:
        sql, params = reprice_select_sql("duckdb", since)
        try:
            reader = con.sql(sql, params=params).to_arrow_reader(100_000)
        except duckdb.CatalogException:
            raise ReportError(f"ledger: {path} has no requests table (not a meter ledger?)") from None
        seen, changes, delta = compute_changes(_arrow_batches_rows(reader), repricer)
        if changes and not dry_run:
            # One UPDATE joined to an Arrow table of (id, new cost): fast on millions of rows.
            batch = pa.table(
                {
                    "id": pa.array([c[0] for c in changes], type=pa.string()),
                    "cost_usd": pa.array([c[1] for c in changes], type=pa.decimal128(18, 9)),
                }
            )
            con.register("reprice_batch", batch)
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute("UPDATE requests SET cost_usd = b.cost_usd FROM reprice_batch AS b WHERE requests.id = b.id::UUID")
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            finally:
                con.unregister("reprice_batch")
    finally:
        con.close()
    return seen, len(changes), delta


def reprice_postgres(url: str, since: dt.datetime | None, repricer: Repricer, *, dry_run: bool = False, batch_size: int = 10_000) -> tuple[int, int, Decimal]:
    store = open_postgres_ledger(url)
    try:
        sql, params = reprice_select_sql("postgresql", since)
        _names, rows = store.query(sql, params)
        seen, changes, delta = compute_changes(rows, repricer)
        if changes and not dry_run:
            # One statement per batch of ids, all in one transaction.
            batches = [
                ([c[0] for c in changes[i : i + batch_size]], [c[1] for c in changes[i : i + batch_size]])
                for i in range(0, len(changes), batch_size)
            ]
            store.execute_many(
                "UPDATE requests SET cost_usd = b.cost_usd FROM unnest($1::text[], $2::numeric[]) AS b(id, cost_usd) WHERE requests.id = b.id::uuid",
                batches,
            )
    except ReportError:
        raise
    except Exception as exc:
        raise ReportError(f"ledger: cannot reprice {_redact(url)}: {_one_line(exc)}") from None
    finally:
        store.close()
    return seen, len(changes), delta


def format_delta(delta: Decimal) -> str:
    sign = "-" if delta < 0 else "+"
    return f"{sign}${format(abs(delta).quantize(NANO), 'f').rstrip('0').rstrip('.') or '0'}"


# --- the commands --------------------------------------------------------------------


def _load_settings(args: argparse.Namespace, **extra: Any) -> Any:
    from .config import load_settings

    return load_settings({"config": args.config, **extra})


def run_report(args: argparse.Namespace) -> int:
    from .cli import CommandError

    try:
        by = parse_by(args.by)
        since, until = parse_window(args.since, args.until)
        if args.url:
            rows, pending = report_url(args.url, by, since, until)
            if pending is not None:
                # stdout keeps its shape for scripts; the caveat goes to stderr, once.
                print(
                    f"meter: warning: the report may be incomplete: the ledger is failing or behind, {pending} records not yet in it",
                    file=sys.stderr,
                )
        else:
            settings = _load_settings(args)
            ledgers = args.ledger or [settings.ledger]
            rows = report_ledgers(ledgers, by, since, until, settings.keys)
            for warning in spool_warnings(ledgers, settings):
                print(f"meter: warning: the report may be incomplete: {warning}", file=sys.stderr)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    sys.stdout.write(render(rows, by, args.format))
    return 0


def count_lines(path: Path) -> int | None:
    """Newlines in a file, read in 1 MiB blocks (a spool may hold millions of records); None if absent."""
    try:
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return None


def spool_warnings(ledgers: Sequence[str], settings: Any) -> list[str]:
    """What a `--ledger` report cannot count: spool files that still hold records.

    A meter whose ledger was down writes what it could not store to its spool and
    replays it when it next opens the ledger; until then a `--ledger` report cannot
    count those records.  The spool is where `meter serve` with these settings
    puts it (beside a DuckDB file, or `--spool`); a PostgreSQL ledger's spool
    lives with each replica, so only an explicit `--spool` setting is checked.
    """
    paths: dict[Path, None] = {}
    for ledger in ledgers:
        if is_postgres_url(ledger) and not settings.spool:
            continue
        paths[Path(settings.model_copy(update={"ledger": ledger}).spool_path())] = None
    warnings = []
    for path in paths:
        try:
            count = count_lines(path)
        except OSError as exc:
            warnings.append(f"cannot read the spool {path} ({exc.strerror}) to tell whether records wait there")
            continue
        if count:
            warnings.append(f"{count} records in {path} are not in the ledger yet (the next meter serve on this ledger replays them)")
    return warnings


def run_reprice(args: argparse.Namespace) -> int:
    from .cli import CommandError
    from .prices import Pricer

    try:
        since, _ = parse_window(args.since, None)
        settings = _load_settings(args, upstream=args.upstream)
        ledger = args.ledger or settings.ledger
        try:
            pricer = Pricer(provider_id=settings.price_provider, upstream_url=settings.upstream, overrides=settings.price_overrides)
        except ValueError as exc:
            raise ReportError(str(exc)) from None
        repricer = Repricer(pricer)
        if is_postgres_url(ledger):
            seen, changed, delta = reprice_postgres(ledger, since, repricer, dry_run=args.dry_run)
        elif "://" in ledger:
            raise ReportError(f"--ledger: a ledger is a DuckDB file or a postgresql:// URL, got {_redact(ledger)!r}")
        else:
            seen, changed, delta = reprice_duckdb(ledger, since, repricer, dry_run=args.dry_run)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    verb = "would reprice" if args.dry_run else "repriced"
    print(f"{verb} {changed} of {seen} rows; cost {format_delta(delta)}")
    return 0


def add_report_commands(subparsers: Any) -> None:
    """Called by `meter.cli.build_parser`: adds `report` and `reprice`."""
    report = subparsers.add_parser(
        "report",
        help="sum requests, tokens and cost by key, model, tier, ...",
        description=(
            "Sum the ledger's requests, tokens and cost per group. WHEN is an ISO date or time "
            "(times without an offset are UTC; --until with a bare date includes that day) or a span back from now (7d, 24h, 30m)."
        ),
    )
    source = report.add_mutually_exclusive_group()
    source.add_argument(
        "--ledger",
        action="append",
        metavar="PATH_OR_URL",
        help="DuckDB file or postgresql:// URL; repeat to report over several replicas' files as one (default: the configured ledger)",
    )
    source.add_argument(
        "--url",
        metavar="http://ADMIN",
        help="ask a running meter's admin address (its DuckDB file is held open); sends METER_ADMIN_TOKEN as a bearer token when set",
    )
    report.add_argument("--since", metavar="WHEN", help="from this time on (inclusive)")
    report.add_argument("--until", metavar="WHEN", help="up to this time (exclusive)")
    report.add_argument("--by", action="append", metavar="FIELDS", help=f"group by a comma-separated list of: {','.join(GROUP_FIELDS)}")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table", help="(default table; csv and json have no total row)")
    report.add_argument("--config", help="TOML config whose [keys] name key_ids (env METER_CONFIG)")
    report.set_defaults(handler=run_report)

    reprice = subparsers.add_parser(
        "reprice",
        help="recompute cost_usd from the stored usage with today's prices",
        description="Recompute cost_usd of every row with usage (from --since on) with today's prices and config overrides; rewrites only rows whose cost changed.",
    )
    reprice.add_argument("--ledger", metavar="PATH_OR_URL", help="DuckDB file or postgresql:// URL (default: the configured ledger; a DuckDB file must not be open in a running meter)")
    reprice.add_argument("--since", metavar="WHEN", help="only rows from this time on: ISO date/time or a span back from now (7d, 24h)")
    reprice.add_argument("--config", help="TOML config: [prices] provider and overrides (env METER_CONFIG)")
    reprice.add_argument("--upstream", help="upstream URL whose provider's prices apply (env METER_UPSTREAM; default https://api.openai.com)")
    reprice.add_argument("--dry-run", dest="dry_run", action="store_true", help="say what would change without writing")
    reprice.set_defaults(handler=run_reprice)
