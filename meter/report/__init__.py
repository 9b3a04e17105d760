"""Reports and repricing over the ledger (SPEC §5, §8).

One concern per module, read in this order:

- `window`: the arguments (`--since`, `--until`, `--by`, `--where`, `--top`)
  read into `ReportArgs`, and `ReportError`;
- `query`: the report SQL for either dialect and `report(store, ...)` over a
  `meter.ledger` Store;
- `render`: the rows as a table, CSV or JSON;
- `reprice`: today's price of stored usage, streamed in bounded memory;
- `client`: `meter report --url`, a running meter's report over HTTP;
- `api`: the admin handler of `GET /api/report` that client asks;
- `commands`: the `report` and `reprice` commands wired into `meter.cli`.
- `sql_command`, `sql_api`, `sql_render`: `meter sql`, one read-only SELECT
  (confined by `meter.ledger.sql`), its `POST /api/sql` and its output.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import ReportAPI
    from .query import METRIC_COLUMNS, output_columns, report, report_sql
    from .reprice import Repricer, format_delta
    from .window import GROUP_FIELDS, Condition, ReportArgs, ReportError, parse_args, parse_by, parse_when, parse_where, parse_window

# Each name from its module when first asked for (PEP 562): a command that reads one
# module of the package (`meter budgets` the table helpers of `render`, every command
# through `meter.cli`) does not load the others, `reprice`'s prices and their package
# (~30 ms and ~20 MiB at every start of a `meter` command) least of all.  The functions
# `render` and `reprice` are their modules' own only: a submodule once imported is an
# attribute of the package by the same name, which no lazy name could stand for.
_HOME = {
    "ReportAPI": "api",
    "METRIC_COLUMNS": "query", "output_columns": "query", "report": "query", "report_sql": "query",
    "Repricer": "reprice", "format_delta": "reprice",
    "GROUP_FIELDS": "window", "Condition": "window", "ReportArgs": "window", "ReportError": "window", "parse_args": "window",
    "parse_by": "window", "parse_when": "window", "parse_where": "window", "parse_window": "window",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # asked once
    return value


__all__ = [
    "GROUP_FIELDS",
    "METRIC_COLUMNS",
    "Condition",
    "ReportAPI",
    "ReportArgs",
    "ReportError",
    "Repricer",
    "format_delta",
    "output_columns",
    "parse_args",
    "parse_by",
    "parse_when",
    "parse_where",
    "parse_window",
    "report",
    "report_sql",
]
