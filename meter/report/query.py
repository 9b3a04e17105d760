"""The report query: one SQL builder for every store, and the rows it returns shaped.

`report(store, by, since, until, key_names)` sums the `requests` table of any
`meter.ledger` Store (a DuckDB file or several read as one, a PostgreSQL
ledger, the store a running meter writes through) by any of `GROUP_FIELDS`.
The dialect switch in `report_sql` covers the few places DuckDB and PostgreSQL
differ (formatting a timestamp as a UTC day or hour); parameters are `$1`-style
on both.  Rows come back as plain dicts in one fixed column order
(`output_columns`), so every path gives the very same objects.

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
  `unmetered`); `errors` counts rows whose outcome is neither `completed` nor
  `in_progress`.
- `cost_usd` is an exact Decimal with 9 places (the ledger's DECIMAL(18,9)).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from ..ledger import HAS_USAGE_SQL, Store
from .window import GROUP_FIELDS, ReportError

NANO = Decimal("0.000000001")

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


def output_columns(by: Sequence[str]) -> list[str]:
    """The exact keys of a report row, in order."""
    cols: list[str] = []
    for name in by:
        cols.append(name)
        if name == "key":
            cols.append("key_hint")
    return cols + list(METRIC_COLUMNS)


def _group_exprs(dialect: str) -> dict[str, str]:
    name = "postgresql" if dialect == "postgres" else dialect
    if name not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; expected one of {DIALECTS}")
    if name == "duckdb":
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


def report_sql(dialect: str, by: Sequence[str], since: dt.datetime | None = None, until: dt.datetime | None = None) -> tuple[str, list[Any]]:
    """The report query over `requests` and its parameters (`$1`, `$2`: every store takes them).

    `key` selects `key_id`, `key_hint` and the stored `key_name`; every other
    field selects itself under its own name.
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
    select.append("count(*) AS requests")
    select += [f"COALESCE(sum({col}), 0) AS {col}" for col in TOKEN_COLUMNS]
    select.append("COALESCE(sum(cost_usd), 0) AS cost_usd")
    select.append(f"count(*) FILTER (WHERE cost_usd IS NULL AND {HAS_USAGE_SQL}) AS unpriced_requests")
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
    sql = "SELECT " + ", ".join(select) + " FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if group:
        sql += " GROUP BY " + ", ".join(group)
        sql += " ORDER BY " + ", ".join(f"{o} NULLS LAST" for o in order)
    return sql, params


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


def report(store: Store, by: Sequence[str], since: dt.datetime | None, until: dt.datetime | None, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The report rows over one store (of either dialect); the store's own errors pass through."""
    sql, params = report_sql(store.dialect, by, since, until)
    names, rows = store.query(sql, params)
    return shape_rows((dict(zip(names, row)) for row in rows), by, key_names)


def one_line(exc: BaseException) -> str:
    """A store's error as the one line a report failure shows (its first line, else its type)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
