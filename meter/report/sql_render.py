"""`meter sql`'s answer as text: the admin API's JSON form, and table, CSV or JSON output.

A query's values are made plain first (`plain`): timestamps, dates, UUIDs and
intervals become their ISO or canonical text, bytes hex, lists and structs JSON
lists and objects; a DECIMAL stays a `Decimal`, so CSV and JSON write it with
`meter.report.render`'s exact 9 decimals (the ledger's money type), never
through a float.  Rows become objects by column name (a repeated name gets a
`_2`, `_3` suffix), and CSV and JSON are `render_csv` and `render_json`, the
forms `meter report` prints.  The admin API answers
`{"columns": [...], "truncated": null|"rows"|"bytes", "rows": <render_json>}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from ..ledger.sql import SqlResult
from .render import display_width, format_cost, json_value, pad, render_csv, render_json, table_text


def plain(value: Any) -> Any:
    """A value JSON can carry (a Decimal stays one, written exactly by `render_json`)."""
    if value is None or isinstance(value, (bool, int, str, Decimal)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN or infinity
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, timedelta)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)


def unique_columns(columns: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in columns:
        n = seen[name] = seen.get(name, 0) + 1
        out.append(name if n == 1 else f"{name}_{n}")
    return out


def as_objects(result: SqlResult) -> tuple[list[str], list[dict[str, Any]]]:
    columns = unique_columns(result.columns)
    return columns, [dict(zip(columns, (plain(v) for v in row))) for row in result.rows]


def answer_json(result: SqlResult) -> str:
    """The admin API's answer."""
    columns, rows = as_objects(result)
    return f'{{"columns": {json.dumps(columns)}, "truncated": {json.dumps(result.truncated)}, "rows": {render_json(rows)}}}\n'


def parse_answer(text: str) -> tuple[list[str], list[dict[str, Any]], str | None]:
    """The inverse of `answer_json`: columns, rows, truncated (raises ValueError)."""
    answer = json.loads(text, parse_float=Decimal)
    if not isinstance(answer, dict) or not isinstance(answer.get("columns"), list) or not isinstance(answer.get("rows"), list):
        raise ValueError("expected an object with columns and rows")  # noqa: TRY004 -- the caller handles a bad answer as ValueError, like json's own
    return answer["columns"], answer["rows"], answer.get("truncated")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_cost(value).rstrip("0").rstrip(".")
    if isinstance(value, (dict, list)):
        return table_text(json_value(value))
    return table_text(value)


def render_grid(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Aligned columns (by the width a terminal gives each character), numbers to the
    right; NULL is blank, a control character in a value its escape (one line per row)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float, Decimal)) and not isinstance(row.get(c), bool) for row in rows if row.get(c) is not None) for c in columns]
    header = [table_text(c) for c in columns]
    widths = [max([display_width(c), *(display_width(line[i]) for line in cells)]) for i, c in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *cells]
    out = []
    for line in lines:
        out.append("  ".join(pad(cell, w, right=num) for cell, w, num in zip(line, widths, numeric)).rstrip())
    return "\n".join(out) + "\n"


def render_sql(columns: Sequence[str], rows: Sequence[dict[str, Any]], fmt: str) -> str:
    """The rows in `fmt`: `table`, `csv` (meter report's CSV) or `json` (its JSON)."""
    if fmt == "json":
        return render_json(rows)
    if fmt == "csv":
        return render_csv([{c: (json_value(v) if isinstance(v, (dict, list)) else v) for c, v in row.items()} for row in rows], columns)
    return render_grid(columns, rows)
