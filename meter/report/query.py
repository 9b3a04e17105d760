"""The report query: one SQL builder for every store, and the rows it returns shaped.

`report(store, args, key_names)` sums the `requests` table of any
`meter.ledger` Store (a DuckDB file or several read as one, a PostgreSQL
ledger, the store a running meter writes through) by any of `GROUP_FIELDS` or
`tag:NAME`, over the rows that meet every `--where`, keeping the `--top` groups.
The dialect switch in `report_sql` covers the few places DuckDB and PostgreSQL
differ (formatting a timestamp as a UTC day or hour, reading one key of the
`tags` JSON); parameters are `$1`-style on both, and every value from the
caller (a tag's name included) is a parameter.  Rows come back as plain dicts
in one fixed column order (`output_columns`), so every path gives the very
same objects.

Output decisions:
- `key` is the name the config in force gives the key_id (the reporting
  side's config: `--config`, or the running meter's for the admin API), else
  the newest name stored in its rows (over every row the report selects, not
  only the group's: split by day or model too, a key renamed while it was used
  is one name in every group), else the key_id; `key_hint` sits beside it.  Rows are per key_id, so a key named after its first requests is one
  row, and two keys given one name stay two rows (told apart by their hints).
  `--where key=V` matches the key_id V, the key_ids the config names V, and
  the keys the config does not name whose newest stored name (in the rows the
  other conditions select) is V: the group `--by key` shows as V.
- `model` is the model that served the request, else the one asked for (as in
  the metrics); `tier` is the tier that served it; `session` the `session_id`.
- `tag:NAME` is that tag's value as text; a row without it (or with an empty
  one) is under NULL, which `--where tag:NAME=` selects.
- `day` is `YYYY-MM-DD` and `hour` `YYYY-MM-DDTHH:00:00Z`, both in UTC.
- token columns are sums of the known values (0 when none is known);
  `unpriced_requests` counts rows with usage but no cost; `unmetered_requests`
  rows of model calls whose usage meter could not read (error_type
  `unmetered`); `errors` counts rows whose outcome is neither `completed` nor
  `in_progress`.
- `cost_usd` is an exact Decimal with 9 places (the ledger's DECIMAL(18,9)),
  the sum of the group's priced rows; None when no row of the group has a
  price (an unknown cost is not a cost of 0).
- `top` ranks groups by cost (an unknown cost last), then requests, highest
  first, and the rows come in that order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from ..ledger import HAS_USAGE_SQL, Store
from .window import GROUP_FIELDS, Condition, ReportArgs, ReportError, tag_name

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


def _dialect(dialect: str) -> str:
    name = "postgresql" if dialect == "postgres" else dialect
    if name not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; expected one of {DIALECTS}")
    return name


def _group_exprs(dialect: str, has_sessions: bool = True) -> dict[str, str]:
    if dialect == "duckdb":
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
        # a ledger no meter has opened since sessions were recorded has no such column:
        # its rows have no session
        "session": "session_id" if has_sessions else "CAST(NULL AS VARCHAR)",
        "day": day,
        "hour": hour,
    }


def _floor_div(expr: str, d: int) -> str:
    """`expr // d` rounded down for negative values too (DuckDB's `//` and `%` round toward
    zero; a row before 1970 belongs to the day it started in, not the next)."""
    return f"(({expr}) - ({d} + ({expr}) % {d}) % {d}) // {d}"


# `day` and `hour` are grouped on the UTC day or hour as a number or timestamp,
# and written as text only once per group: formatting a timestamp on each of a
# million rows took DuckDB 0.4 s, the number 0.03 s.  Each is (the bucket's SQL,
# its text from the bucket's column `{g}`).
_BUCKETS = {
    "duckdb": {
        "day": (_floor_div("epoch_us(started_at)", 86_400_000_000), "strftime(make_timestamp({g} * 86400000000), '%Y-%m-%d')"),
        "hour": (_floor_div("epoch_us(started_at)", 3_600_000_000), "strftime(make_timestamp({g} * 3600000000), '%Y-%m-%dT%H:00:00Z')"),
    },
    "postgresql": {
        "day": ("date_trunc('day', started_at AT TIME ZONE 'UTC')", "to_char({g}, 'YYYY-MM-DD')"),
        "hour": ("date_trunc('hour', started_at AT TIME ZONE 'UTC')", "to_char({g}, 'YYYY-MM-DD\"T\"HH24\":00:00Z\"')"),
    },
}

# The newest name stored with a key_id's rows (the config that wrote it may since
# have renamed the key).  DuckDB's arg_max keeps one value per group where the
# ordered array_agg sorted every row (1.9 s of a million rows by hour and key, then
# 0.2 s); PostgreSQL has no arg_max.
_STORED_NAME = {
    "duckdb": "arg_max(key_name, started_at) FILTER (WHERE key_name IS NOT NULL)",
    "postgresql": "(array_agg(key_name ORDER BY started_at DESC) FILTER (WHERE key_name IS NOT NULL))[1]",
}


class _Params:
    """`$n` parameters in the order the SQL text takes them (both dialects reuse a `$n`)."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _tag_expr(dialect: str, tag: str, params: _Params) -> str:
    """One tag's value as text (NULL when the row has no such tag, or an empty one).  The
    name goes in as a parameter (it is checked, but never spliced into the SQL)."""
    if dialect == "duckdb":
        path = '$."' + tag + '"'  # a JSON path naming the key (a tag name may hold '-')
        return f"NULLIF(json_extract_string(tags, {params.add(path)}), '')"
    return f"NULLIF(tags::jsonb ->> {params.add(tag)}, '')"


def _key_condition(dialect: str, value: str | None, key_names: Mapping[str, str], params: _Params, scope: Sequence[str]) -> str:
    """`key=VALUE`: the key_id itself, a key_id the config names VALUE, or a key the config
    does not name whose newest stored name, over the rows the report's other conditions
    (`scope`) select, is VALUE: the name `--by key` shows it under.  A key renamed
    while it was used has rows stored under each name; matching each row by its own
    name would split the one group `--by key` shows into rows of either name."""
    if value is None:
        return "key_id IS NULL"
    alternatives = [f"key_id = {params.add(value)}"]
    named = sorted(kid for kid, name in key_names.items() if name == value)
    if named:
        alternatives.append(f"key_id IN ({', '.join(params.add(kid) for kid in named)})")
    # Only rows with a stored name decide it: leaving the others out of the subquery's
    # scan keeps a filter by name as fast as one by key_id (0.16 -> 0.06 s over a million).
    inner = ["key_name IS NOT NULL", *scope]
    if key_names:
        inner.append(f"key_id NOT IN ({', '.join(params.add(kid) for kid in sorted(key_names))})")
    alternatives.append(
        f"key_id IN (SELECT key_id FROM requests WHERE {' AND '.join(inner)} GROUP BY key_id HAVING {_STORED_NAME[dialect]} = {params.add(value)})"
    )
    return "(" + " OR ".join(alternatives) + ")"


def _condition(dialect: str, cond: Condition, exprs: Mapping[str, str], params: _Params) -> str:
    """Any condition but `key` (`_key_condition`)."""
    if cond.start is not None and cond.end is not None:  # day, hour: a range of started_at
        return f"(started_at >= {params.add(cond.start)} AND started_at < {params.add(cond.end)})"
    tag = tag_name(cond.field)
    expr = _tag_expr(dialect, tag, params) if tag is not None else exprs[cond.field]
    return f"{expr} IS NULL" if cond.value is None else f"{expr} = {params.add(cond.value)}"


def _conditions(
    dialect: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    where: Sequence[Condition],
    exprs: Mapping[str, str],
    key_names: Mapping[str, str],
    params: _Params,
) -> list[str]:
    """The WHERE conditions of the window and every `--where` (ANDed).  A key's name is
    read from the rows every other condition selects, as `--by key` reads it."""
    scope: list[str] = []
    if since is not None:
        scope.append(f"started_at >= {params.add(since)}")
    if until is not None:
        scope.append(f"started_at < {params.add(until)}")
    scope += [_condition(dialect, cond, exprs, params) for cond in where if cond.field != "key"]
    keys = [_key_condition(dialect, cond.value, key_names, params, scope) for cond in where if cond.field == "key"]
    return scope + keys


def report_sql(
    dialect: str,
    by: Sequence[str],
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    where: Sequence[Condition] = (),
    top: int | None = None,
    key_names: Mapping[str, str] | None = None,
    has_sessions: bool = True,
) -> tuple[str, list[Any]]:
    """The report query over `requests` and its parameters (`$1`, `$2`: every store takes them).

    `key` selects `key_id` and `key_hint` (its stored name is `stored_key_names_sql`'s); the
    field at position n of `by` is `gn` (no name from the caller is SQL text).
    Groups are named by position (a parameter in a grouped expression,
    `tag:NAME`'s name, is then given once).
    `top` keeps the groups of highest cost, then requests.
    """
    dialect = _dialect(dialect)
    exprs = _group_exprs(dialect, has_sessions)
    names = key_names or {}
    params = _Params()
    select: list[str] = []
    group: list[str] = []
    outer: list[str] = []  # the columns as returned: a time bucket written as text
    for n, name in enumerate(by):
        if name == "key":
            select += ["key_id AS key_id", "key_hint AS key_hint"]
            group += [str(len(select) - 1), str(len(select))]
            outer += ["key_id", "key_hint"]
            continue
        outer.append(f"g{n}")
        tag = tag_name(name)
        if tag is not None:
            select.append(f"{_tag_expr(dialect, tag, params)} AS g{n}")
        elif name in _BUCKETS[dialect]:
            bucket, text = _BUCKETS[dialect][name]
            select.append(f"{bucket} AS g{n}")
            outer[-1] = f"{text.format(g=f'g{n}')} AS g{n}"
        elif name in exprs:
            select.append(f"{exprs[name]} AS g{n}")
        else:
            raise ReportError(f"--by: unknown field {name!r}; choose from {', '.join(GROUP_FIELDS)}")
        group.append(str(len(select)))
    select.append("count(*) AS requests")
    select += [f"COALESCE(sum({col}), 0) AS {col}" for col in TOKEN_COLUMNS]
    select.append("sum(cost_usd) AS cost_usd")  # NULL when no row of the group has a price
    select.append(f"count(*) FILTER (WHERE cost_usd IS NULL AND {HAS_USAGE_SQL}) AS unpriced_requests")
    select.append("count(*) FILTER (WHERE error_type = 'unmetered') AS unmetered_requests")
    ok = ", ".join(f"'{o}'" for o in OK_OUTCOMES)
    select.append(f"count(*) FILTER (WHERE outcome IS NULL OR outcome NOT IN ({ok})) AS errors")
    conditions = _conditions(dialect, since, until, where, exprs, names, params)
    sql = "SELECT " + ", ".join(select) + " FROM requests"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if group:
        sql += " GROUP BY " + ", ".join(group)
    if any(name in _BUCKETS[dialect] for name in by):
        # Same columns in the same positions (a bucket's number and its text sort alike).
        sql = "SELECT " + ", ".join([*outer, *METRIC_COLUMNS]) + f" FROM ({sql}) AS grouped"
    order = [f"{g} NULLS LAST" for g in group]
    if top is not None:
        sql += " ORDER BY " + ", ".join(["cost_usd DESC NULLS LAST", "requests DESC", *order])
        sql += f" LIMIT {params.add(top)}"
    elif order:
        sql += " ORDER BY " + ", ".join(order)
    return sql, params.values


def key_label(kid: str | None, key_names: Mapping[str, str], stored_names: Mapping[str, str]) -> str | None:
    """A key as a report shows it: the config's name, else the newest stored one, else the key_id."""
    if kid is None:
        return None
    return key_names.get(kid) or stored_names.get(kid) or kid


def shape_rows(
    raw: Iterable[Mapping[str, Any]],
    by: Sequence[str],
    key_names: Mapping[str, str] | None = None,
    top: int | None = None,
    stored_names: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Query rows -> report rows: exact columns, key names applied (`stored_names`: the
    newest name stored per key_id, `stored_key_names`), sorted by the group fields (with
    `top`: by cost, then requests, highest first)."""
    names = key_names or {}
    stored = stored_names or {}
    out: list[dict[str, Any]] = []
    for r in raw:
        row: dict[str, Any] = {}
        for n, name in enumerate(by):
            if name == "key":
                row["key"] = key_label(r["key_id"], names, stored)
                row["key_hint"] = r["key_hint"]
            else:
                row[name] = r[f"g{n}"]
        for col in METRIC_COLUMNS:
            value = r[col]
            if col == "cost_usd":
                row[col] = None if value is None else Decimal(value).quantize(NANO)
            else:
                row[col] = int(value or 0)
        out.append(row)

    def group_key(row: dict[str, Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        for name in by:
            for col in (("key", "key_hint") if name == "key" else (name,)):
                value = row[col]
                parts.append((value is None, "" if value is None else str(value)))
        return tuple(parts)

    if top is None:
        out.sort(key=group_key)
    else:
        out.sort(key=lambda row: (row["cost_usd"] is None, -(row["cost_usd"] or 0), -row["requests"], group_key(row)))
    return out


def report(store: Store, args: ReportArgs, key_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The report rows over one store (of either dialect); the store's own errors pass through."""
    has_sessions = has_session_column(store, args)
    sql, params = report_sql(store.dialect, args.by, args.since, args.until, args.where, args.top, key_names, has_sessions)
    names, rows = store.query(sql, params)
    stored = stored_key_names(store, args, key_names, has_sessions) if "key" in args.by else {}
    return shape_rows((dict(zip(names, row)) for row in rows), args.by, key_names, args.top, stored)


def has_session_column(store: Store, args: ReportArgs) -> bool:
    """Whether the ledger has `session_id`, when the report asks for sessions (a ledger no
    meter has opened since sessions were recorded has none: its rows have no session)."""
    if "session" in args.by or any(c.field == "session" for c in args.where):
        columns, _ = store.query("SELECT * FROM requests LIMIT 0")
        return "session_id" in columns
    return True


def stored_key_names_sql(
    dialect: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    where: Sequence[Condition] = (),
    key_names: Mapping[str, str] | None = None,
    has_sessions: bool = True,
    only: Sequence[str] | None = None,
) -> tuple[str, list[Any]]:
    """(key_id, newest stored key_name) of each key the config does not name (of the
    key_ids `only`, when given), over every row the window and filters select.  Over
    the whole selection, not per group: taken per group, a key named after its first
    requests was its key_id on the groups (days, models) before and its name on those
    after, and `--where key=NAME` (which reads the name over the same rows) selected
    groups labelled with the key_id."""
    dialect = _dialect(dialect)
    names = key_names or {}
    params = _Params()
    conditions = ["key_name IS NOT NULL", *_conditions(dialect, since, until, where, _group_exprs(dialect, has_sessions), names, params)]
    if names:
        conditions.append(f"key_id NOT IN ({', '.join(params.add(kid) for kid in sorted(names))})")
    if only is not None:
        conditions.append(f"key_id IN ({', '.join(params.add(kid) for kid in sorted(set(only)))})" if only else "FALSE")
    sql = f"SELECT key_id, {_STORED_NAME[dialect]} AS key_name FROM requests WHERE {' AND '.join(conditions)} GROUP BY key_id"
    return sql, params.values


def stored_key_names(
    store: Store, args: ReportArgs, key_names: Mapping[str, str] | None = None, has_sessions: bool = True, only: Sequence[str] | None = None
) -> dict[str, str]:
    """key_id -> the newest name stored in the rows a report with `args` selects (for the
    key_ids `only`, when given)."""
    sql, params = stored_key_names_sql(store.dialect, args.since, args.until, args.where, key_names, has_sessions, only)
    _, rows = store.query(sql, params)
    return {kid: name for kid, name in rows if kid is not None and name is not None}


def one_line(exc: BaseException) -> str:
    """A store's error as the one line a report failure shows (its first line, else its type)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def filter_sql(
    dialect: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    where: Sequence[Condition] = (),
    key_names: Mapping[str, str] | None = None,
    has_sessions: bool = True,
) -> tuple[str, list[Any]]:
    """The WHERE text (`true` when nothing is asked) and its `$n` parameters that a report
    with this window and these filters selects rows by: the console lists the very rows
    the report sums."""
    dialect = _dialect(dialect)
    exprs = _group_exprs(dialect, has_sessions)
    params = _Params()
    conditions = _conditions(dialect, since, until, where, exprs, key_names or {}, params)
    return (" AND ".join(conditions) or "true"), params.values
