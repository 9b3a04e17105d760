"""`meter budgets`: each budget's window, spend, limit, remaining, share and state.

- `--url http://ADMIN` asks a running meter (`GET /api/budgets`): its figures,
  which include its own records not yet written (a redirect is refused, never
  followed: METER_ADMIN_TOKEN goes to that address only);
- `--ledger PATH_OR_URL` (default: the configured ledger) reads the ledger
  directly with the budgets of `--config`: what every replica has written.

One row per budget, in the config's order; table, CSV or JSON (`share` is
spend / limit: a fraction in CSV and JSON, a percentage in the table).  Money
is written from the decimal, never through a float.  Bad input is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from ..command import CommandError
from ..config import load_settings, redact_url
from ..report.render import display_width, pad, render_csv, table_text

COLUMNS = ("budget", "window", "window_start", "window_end", "mode", "spend_usd", "limit_usd", "remaining_usd", "share", "state")
_MONEY = ("spend_usd", "limit_usd", "remaining_usd")


def _cell(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral() else format(value, "f").rstrip("0")
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def budget_rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list of objects; money as exact decimal numbers."""
    objects = []
    for row in rows:
        parts = [f"{json.dumps(k)}: {_cell(v) if k in _MONEY else json.dumps(v)}" for k, v in row.items()]
        objects.append("{" + ", ".join(parts) + "}")
    return "[" + ",\n ".join(objects) + "]\n" if objects else "[]\n"


def render_budgets(rows: Sequence[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return budget_rows_json(rows)
    if fmt == "csv":
        return render_csv(rows, COLUMNS, cell=_cell)
    # Escaped and padded as `meter report`'s table: a wide character takes two columns.
    cells = [list(COLUMNS)] + [[f"{row[c]:.1%}" if c == "share" else table_text(_cell(row[c])) for c in COLUMNS] for row in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "".join("  ".join(pad(c, w, right=False) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in cells)


def _parse(text: str) -> list[dict[str, Any]]:
    rows = json.loads(text, parse_float=Decimal)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(COLUMNS) <= set(r) for r in rows):
        raise ValueError("not a list of budgets")
    for row in rows:
        for name in _MONEY:
            row[name] = Decimal(row[name])
        row["share"] = float(row["share"])
    return rows


def budgets_from_url(base: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    from ..report.client import ask_admin
    from ..report.window import ReportError

    try:
        raw, _ = ask_admin(base, "/api/budgets", "budgets", timeout=timeout)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    try:
        return _parse(raw.decode("utf-8"))
    except (ValueError, KeyError, ArithmeticError):
        raise CommandError(f"--url: {base} did not answer with budgets") from None


def budgets_from_ledger(ledger: str, config: str | None) -> list[dict[str, Any]]:
    from ..ledger import LedgerReadError, open_reader
    from .spend import Budgets
    from .sync import read_spend

    settings = load_settings({"config": config})
    budgets = Budgets(settings.budgets, settings.keys)
    if not budgets.states:
        return []
    try:
        store = open_reader([ledger])
    except LedgerReadError as exc:
        raise CommandError(str(exc)) from None
    try:
        windows = budgets.windows()
        sums = read_spend(store, [s.matcher for s in budgets.states], windows, None)
    except Exception as exc:  # noqa: BLE001 - whatever the store raises is one line
        raise CommandError(f"ledger: cannot read {redact_url(ledger)}: {type(exc).__name__}") from None
    finally:
        store.close()
    budgets.set_others(windows, sums)
    return budgets.rows(time.time())


def run_budgets(args: argparse.Namespace) -> int:
    if args.url:
        if args.config:
            raise CommandError("--config does not apply with --url: a running meter reports the budgets of its own config; read with --ledger and --config instead")
        rows = budgets_from_url(args.url)
    else:
        ledger = args.ledger or load_settings({"config": args.config}).ledger
        rows = budgets_from_ledger(ledger, args.config)
    print(render_budgets(rows, args.format), end="")
    return 0


def add_budgets_command(subparsers: Any) -> None:
    """Called by `meter.cli.build_parser`."""
    cmd = subparsers.add_parser(
        "budgets",
        help="each budget's window, spend, limit, remaining, share and state",
        description="Show each [[budgets]] entry's current window, spend (every replica's), limit, remaining, share and state.",
    )
    source = cmd.add_mutually_exclusive_group()
    source.add_argument("--url", metavar="http://ADMIN", help="ask a running meter's admin address (GET /api/budgets); sends METER_ADMIN_TOKEN when set")
    source.add_argument("--ledger", metavar="PATH_OR_URL", help="read spend from this DuckDB file or postgresql:// URL (env METER_LEDGER; default: the configured ledger)")
    cmd.add_argument("--config", help="TOML config with the [[budgets]] and [keys] (env METER_CONFIG); not with --url, where the meter's own budgets apply")
    cmd.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    cmd.set_defaults(handler=run_budgets)
