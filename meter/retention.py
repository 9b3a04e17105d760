"""`meter prune`: delete what is older than a span from a ledger, on either store.

`meter prune --older-than 180d` deletes the rows whose `started_at` is older,
with the usage and alert claims that follow them (the rules:
`meter.ledger.prune`), in one transaction, and prints `pruned N rows older than
WHEN`.  A DuckDB file is then compacted so that it shrinks; one open in a
running meter is refused (stop it first, as for `meter reprice`).  A
PostgreSQL ledger can be pruned live, and is vacuumed after.  `--dry-run`
counts the rows without deleting anything.

Every failure is one `CommandError` line (exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from .command import CommandError
from .config import load_settings, redact_url
from .ledger import DuckDBStore, LedgerReadError, open_reader
from .ledger.prune import COUNT_SQL, Pruned, bound_memory, compact
from .report.query import one_line
from .report.window import ReportError, parse_when


def cutoff(older_than: str, now: dt.datetime | None = None) -> dt.datetime:
    """The time `--older-than` names: a span back from now (180d, 12w) or an ISO date or time."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        before = parse_when(older_than, name="--older-than", now=now)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    if before > now:
        raise CommandError(f"--older-than: {before.isoformat(timespec='seconds')} is in the future; it would delete every row")
    return before


def run_prune(args: argparse.Namespace) -> int:
    before = cutoff(args.older_than)
    settings = load_settings({"config": args.config})
    ledger = args.ledger or settings.ledger
    when = before.isoformat(timespec="seconds")
    try:
        store = open_reader([ledger], writable=not args.dry_run)
    except LedgerReadError as exc:
        raise CommandError(str(exc)) from None
    try:
        if args.dry_run:
            _, rows = store.query(COUNT_SQL, [before])
            print(f"would prune {int(rows[0][0])} rows older than {when}")
            return 0
        if isinstance(store, DuckDBStore):
            bound_memory(store.con)
        pruned = store.prune(before)
        if isinstance(store, DuckDBStore) and pruned != Pruned():
            # A prune that deleted nothing leaves the file as it was, uncopied (a daily
            # prune of a large ledger would otherwise rewrite it every day).
            con, store.con = store.con, None  # compact closes it
            compact(con, store.path)
    except Exception as exc:  # noqa: BLE001 -- whatever the store raises is one line, never a traceback
        raise CommandError(f"ledger: cannot prune {redact_url(ledger)}: {one_line(exc)}") from None
    finally:
        store.close()
    print(f"pruned {pruned.rows} rows older than {when}")
    return 0


def add_prune_command(subparsers: Any) -> None:
    """Called by `meter.cli.build_parser`."""
    prune = subparsers.add_parser(
        "prune",
        help="delete ledger rows older than a span, with their claims",
        description=(
            "Delete the rows whose started_at is older than --older-than, with the usage and alert claims "
            "that follow them, in one transaction; a DuckDB file is compacted after, a PostgreSQL ledger vacuumed."
        ),
    )
    prune.add_argument("--older-than", dest="older_than", required=True, metavar="WHEN", help="a span back from now (180d, 26w, 24h) or an ISO date or time (UTC without an offset)")
    prune.add_argument("--ledger", metavar="PATH_OR_URL", help="DuckDB file or postgresql:// URL (env METER_LEDGER; default: the configured ledger; a DuckDB file must not be open in a running meter)")
    prune.add_argument("--config", help="TOML config naming the ledger (env METER_CONFIG)")
    prune.add_argument("--dry-run", dest="dry_run", action="store_true", help="count the rows that would go, without deleting")
    prune.set_defaults(handler=run_prune)
