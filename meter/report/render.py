"""A report's rows as text: an aligned table, CSV or JSON.

`render_json` is the one JSON form, printed by `meter report --format json` and
served by the admin API alike (`parse_json_rows` reads it back for `--url`), so
every path gives the same objects.  `cost_usd` is exact everywhere: in JSON a
number with exactly 9 decimals written from the decimal, never through a float;
in CSV the same digits; in the table trimmed to at most 9 places.  A group with
no priced row has no cost: `null` in JSON, an empty CSV cell, a blank table
cell (never 0).  Only the table has a total row: the sum of the rows shown (its
cost blank when none of them has one).  The table is for a terminal: a control
character in a group value (a line break in a key name or tag value a client
chose) is written as its escape (`\\n`), so each group stays one line, and
columns are aligned by the width a terminal gives each character (two for a
wide one); CSV and JSON keep every value as it is.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from decimal import Context, Decimal
from typing import Any

from .query import METRIC_COLUMNS, NANO, output_columns


def format_cost(value: Decimal) -> str:
    """Exactly 9 decimals, no exponent: `0.001234567`, `12.500000000`.  Any width: the
    context is as wide as the value (a DECIMAL(38,0) from `meter sql` is past the
    default context's 28 digits, and a PostgreSQL numeric may be far wider); a value
    that is not a number (NaN, Infinity: PostgreSQL's numeric has both) as its name."""
    value = Decimal(value)
    if not value.is_finite():
        return str(value)
    wide = Context(prec=max(28, value.adjusted() + 12))  # its integer digits, the 9 decimals, a margin
    return format(value.quantize(NANO, context=wide), "f")


def json_value(value: Any) -> str:
    """One value as JSON text, a Decimal exact (`format_cost`) at any depth: a list or an
    object from `meter sql` (`list(cost_usd)`) may hold one, which json.dumps refuses."""
    if isinstance(value, Decimal):
        return format_cost(value) if value.is_finite() else json.dumps(str(value))  # JSON has no NaN
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {json_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def render_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list, one object per line; `cost_usd` written from the decimal, never through a float."""
    if not rows:
        return "[]\n"
    objects = ["{" + ", ".join(f"{json.dumps(k)}: {json_value(v)}" for k, v in row.items()) + "}" for row in rows]
    return "[\n  " + ",\n  ".join(objects) + "\n]\n"


def parse_json_rows(text: str) -> list[dict[str, Any]]:
    """The inverse of `render_json`, keeping `cost_usd` exact."""
    rows = json.loads(text, parse_float=Decimal)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected a JSON list of objects")
    for row in rows:
        if row.get("cost_usd") is not None:
            row["cost_usd"] = Decimal(row["cost_usd"]).quantize(NANO)
    return rows


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_cost(value)
    return str(value)


def render_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], cell: Callable[[Any], str] = _csv_cell) -> str:
    """A header line and one line per row, each value written by `cell` (by default an
    absent group value is an empty cell and a cost has its exact digits)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row[c]) for c in columns])
    return buf.getvalue()


def _table_cost(value: Decimal | None) -> str:
    if value is None:
        return ""
    text = format_cost(value).rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def table_text(value: Any) -> str:
    """A group value as one table cell: a control character (C0, DEL, C1, a line or
    paragraph separator) as its escape, so a value cannot break the row or move the cursor."""
    if value is None:
        return "-"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)


def display_width(text: str) -> int:
    """Columns a terminal gives `text`: two for a wide or full-width character, none for a
    combining mark."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def pad(text: str, width: int, right: bool) -> str:
    fill = " " * (width - display_width(text))
    return fill + text if right else text + fill


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Aligned columns; the last row is the total (without --by it is the only row)."""
    group_cols = [c for c in columns if c not in METRIC_COLUMNS]
    header = list(columns) if group_cols else ["", *columns]
    totals: dict[str, Any] = {c: (None if c == "cost_usd" else 0) for c in METRIC_COLUMNS}
    body: list[list[str]] = []
    for row in rows:
        for c in METRIC_COLUMNS:
            if c != "cost_usd":
                totals[c] += row[c]
            elif row[c] is not None:
                totals[c] = row[c] + (totals[c] or 0)
        cells = [table_text(row[c]) for c in group_cols]
        cells += [_table_cost(row[c]) if c == "cost_usd" else str(row[c]) for c in METRIC_COLUMNS]
        body.append(cells)
    total = ["total"] + [""] * (len(group_cols) - 1) if group_cols else ["total"]
    total += [_table_cost(totals[c]) if c == "cost_usd" else str(totals[c]) for c in METRIC_COLUMNS]
    if not group_cols:
        body = []  # the one row of totals is the total row
    lines = [header, *body, total]
    widths = [max(display_width(line[i]) for line in lines) for i in range(len(header))]
    first_metric = len(header) - len(METRIC_COLUMNS)
    out = []
    for n, line in enumerate(lines):
        cells = [pad(cell, w, right=i >= first_metric) for i, (cell, w) in enumerate(zip(line, widths))]
        if n == len(lines) - 1 and len(lines) > 1:
            out.append("  ".join("-" * w for w in widths))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def render(rows: Sequence[Mapping[str, Any]], by: Sequence[str], fmt: str) -> str:
    """The rows in `fmt` (`table`, `csv` or `json`), columns as `output_columns(by)`."""
    columns = output_columns(by)
    if fmt == "json":
        return render_json(rows)
    if fmt == "csv":
        return render_csv(rows, columns)
    return render_table(rows, columns)
