"""The `reconcile` command: its arguments, the admin key, and what it prints.

`meter reconcile` compares meter's books (a ledger, or a running meter's
admin API with `--url`) with the provider's organisation Usage and Costs APIs
(`meter.reconcile.compare`) per UTC day and whatever else `--by` names.  The
window is whole UTC days, as the provider's buckets are: `--since` is moved
back to its day's midnight and `--until` on to the next one.  The admin key
comes from the environment variable `[reconcile] admin_key_env` names
(default `OPENAI_ADMIN_KEY`): never a flag, never printed.

Exit status: 0 every group matches, 1 some group does not, 2 bad arguments,
an unreachable API, no admin key, or a provider without these APIs (one line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from ..command import CommandError
from ..config import load_settings, redact_url
from ..ledger import LedgerReadError, open_reader
from ..report.client import report_url
from ..report.query import one_line, report
from ..report.render import format_cost, render_csv
from ..report.window import ReportArgs, ReportError, parse_window
from .compare import BY_FIELDS, NUMBERS, Group, Reconciliation, compare, meter_by
from .provider import ProviderClient, ProviderError

DEFAULT_DAYS = 7
EXIT_DIFFERS = 1
# Hosts that serve OpenAI's models without OpenAI's organisation APIs.
_NO_USAGE_API = (".openai.azure.com", ".azure-api.net", ".cognitiveservices.azure.com", ".services.ai.azure.com")


def parse_by(values: Sequence[str] | None) -> list[str]:
    fields = [f.strip().lower() for v in (values or ["day,model"]) for f in v.split(",") if f.strip()]
    for f in fields:
        if f not in BY_FIELDS:
            raise CommandError(f"reconcile: --by: unknown field {f!r}; expected some of {','.join(BY_FIELDS)}")
    return list(dict.fromkeys(fields))


def whole_days(since: dt.datetime | None, until: dt.datetime | None, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The window widened to whole UTC days (the provider's buckets)."""
    today = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = (since or today - dt.timedelta(days=DEFAULT_DAYS)).astimezone(dt.UTC)
    start = start.replace(hour=0, minute=0, second=0, microsecond=0)
    end = (until or today + dt.timedelta(days=1)).astimezone(dt.UTC)
    midnight = end.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, (midnight if midnight == end else midnight + dt.timedelta(days=1))


def columns(by: Sequence[str]) -> list[str]:
    cols = [*by, "verdict"]
    for n in NUMBERS:
        cols += [f"meter_{n}", f"provider_{n}", f"diff_{n}"]
    return cols + ["differing"]


def flat(group: Group, by: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(by, group.values))
    row["verdict"] = group.verdict
    for n in NUMBERS:
        m = getattr(group.meter, n) if group.meter else None
        p = getattr(group.provider, n) if group.provider else None
        if n != "cost_usd":
            m, p = (m if group.meter else 0), (p if group.provider else 0)
        row[f"meter_{n}"], row[f"provider_{n}"] = m, p
        row[f"diff_{n}"] = None if m is None or p is None else m - p
    row["differing"] = ",".join(group.differing)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return format_cost(value).rstrip("0").rstrip(".") or "0"
    return str(value)


def render_table(result: Reconciliation) -> str:
    """One line per group: each number as `meter/provider`, then the verdict and what differs."""
    header = [*result.by, "requests", "input", "cached", "output", "cost_usd", "verdict", "differing"]
    lines = [header]
    for g in result.groups:
        row = flat(g, result.by)
        cells = ["-" if v is None else str(v) for v in g.values]
        cells += [f"{_cell(row['meter_' + n])}/{_cell(row['provider_' + n])}" for n in NUMBERS]
        lines.append(cells + [g.verdict, ",".join(g.differing)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    counts = ", ".join(f"{n} {v}" for v, n in result.counts().items())
    out.append(
        f"{result.since:%Y-%m-%d} to {result.until:%Y-%m-%d} (UTC, the end exclusive); each cell is meter/provider; groups: {counts}"
    )
    out += [f"note: {note}" for note in result.notes]
    return "\n".join(out) + "\n"


def render_json(result: Reconciliation) -> str:
    def value(v: Any) -> Any:
        return format_cost(v) if isinstance(v, Decimal) else v

    body = {
        "since": result.since.isoformat(),
        "until": result.until.isoformat(),
        "counts": result.counts(),
        "groups": [{k: value(v) for k, v in flat(g, result.by).items()} for g in result.groups],
        "notes": result.notes,
    }
    return json.dumps(body, indent=2) + "\n"


def render(result: Reconciliation, fmt: str) -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "csv":
        return render_csv([flat(g, result.by) for g in result.groups], columns(result.by))
    return render_table(result)


def run_reconcile(args: argparse.Namespace, now: dt.datetime | None = None) -> int:
    by = parse_by(args.by)
    try:
        since, until = whole_days(*parse_window(args.since, args.until), now or dt.datetime.now(dt.UTC))
    except ReportError as exc:
        raise CommandError(f"reconcile: {exc}") from None
    settings = load_settings({"config": args.config, "upstream": args.upstream})
    host = (urlsplit(settings.upstream).hostname or "").lower()
    if host.endswith(_NO_USAGE_API):
        raise CommandError(
            f"reconcile: {redact_url(settings.upstream)} is Azure, which has no organisation Usage and Costs APIs; reconcile works with OpenAI's"
        )
    env = settings.reconcile.admin_key_env
    admin_key = os.environ.get(env, "").strip()
    if not admin_key:
        raise CommandError(f"reconcile: no admin key: set {env} to an OpenAI admin key (the variable [reconcile] admin_key_env names)")
    provider = ProviderClient(settings.upstream, admin_key)
    projects = list(settings.reconcile.projects)
    wanted = ReportArgs(by=meter_by(by, projects), since=since, until=until)
    try:
        if args.url:
            rows, pending = report_url(args.url, wanted)
            if pending is not None:
                print(f"meter: warning: meter's side may be incomplete: {pending} records not yet in its ledger", file=sys.stderr)
        else:
            rows = _ledger_rows(args.ledger or [settings.ledger], wanted)
        result = compare(rows, provider, since, until, by, settings.reconcile.tolerance, projects)
    except ReportError as exc:
        raise CommandError(f"reconcile: {exc}") from None
    except ProviderError as exc:
        raise CommandError(f"reconcile: {exc}") from None
    sys.stdout.write(render(result, args.format))
    if args.format != "table":
        for note in result.notes:
            print(f"meter: note: {note}", file=sys.stderr)
    return 0 if result.ok else EXIT_DIFFERS


def _ledger_rows(ledgers: Sequence[str], wanted: ReportArgs) -> list[dict[str, Any]]:
    try:
        store = open_reader(ledgers)
    except LedgerReadError as exc:
        raise CommandError(str(exc)) from None
    try:
        return report(store, wanted)
    except Exception as exc:  # noqa: BLE001 -- whatever the store raises is one line, never a traceback
        raise CommandError(f"ledger: cannot read {', '.join(map(redact_url, ledgers))}: {one_line(exc)}") from None
    finally:
        store.close()


def add_reconcile_command(subparsers: Any) -> None:
    """Called by `meter.cli.build_parser`: adds `reconcile`."""
    cmd = subparsers.add_parser(
        "reconcile",
        help="compare meter's books with the provider's usage and costs APIs",
        description=(
            "Compare meter's requests, tokens and cost per UTC day (and --by) with the provider's organisation Usage and Costs APIs, "
            "read with the admin key in the variable [reconcile] admin_key_env names (default OPENAI_ADMIN_KEY). "
            "Exit 0 when every group matches, 1 when one does not, 2 on an error."
        ),
    )
    source = cmd.add_mutually_exclusive_group()
    source.add_argument(
        "--ledger",
        action="append",
        metavar="PATH_OR_URL",
        help="DuckDB file or postgresql:// URL; repeat for several replicas' files (env METER_LEDGER; default: the configured ledger)",
    )
    source.add_argument(
        "--url",
        metavar="http://ADMIN",
        help="ask a running meter's admin address for its side; sends METER_ADMIN_TOKEN as a bearer token when set",
    )
    cmd.add_argument("--since", metavar="WHEN", help=f"from this UTC day on (default {DEFAULT_DAYS} days back)")
    cmd.add_argument("--until", metavar="WHEN", help="up to this UTC day (a bare date includes it; default: through today)")
    cmd.add_argument(
        "--by", action="append", metavar="FIELDS", help=f"group by a comma-separated list of: {','.join(BY_FIELDS)} (default day,model)"
    )
    cmd.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    cmd.add_argument("--upstream", help="the provider's base URL (env METER_UPSTREAM; default https://api.openai.com)")
    cmd.add_argument("--config", help="TOML config: [reconcile], [keys], the ledger (env METER_CONFIG)")
    cmd.set_defaults(handler=run_reconcile)
