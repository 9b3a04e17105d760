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

from .api import ReportAPI
from .query import METRIC_COLUMNS, output_columns, report, report_sql
from .render import render
from .reprice import Repricer, format_delta, reprice
from .window import GROUP_FIELDS, Condition, ReportArgs, ReportError, parse_args, parse_by, parse_when, parse_where, parse_window

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
    "render",
    "report",
    "report_sql",
    "reprice",
]
