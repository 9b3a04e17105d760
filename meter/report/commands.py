"""The `report` and `reprice` commands: their arguments and what they run.

`meter report` sums the ledger per group (`meter.report.query`), over the rows
every `--where` selects, keeping the `--top` groups, with key names from the
config in force (`--config` for a ledger; for `--url` the running meter's own,
with the `[keys]` of a `--config` flag over them),
over

- one or more DuckDB files (`--ledger`, repeatable: the replicas of a fleet
  report as one),
- a PostgreSQL ledger (`--ledger postgresql://...`), or
- a running meter's admin API (`--url http://ADMIN`, `meter.report.client`),
  since a running meter holds its DuckDB file open.  When the meter says some
  records are not yet in its ledger, one warning line goes to stderr; stdout
  keeps its shape.  A `--ledger` report warns the same way when the ledger's
  spool still holds records a meter could not write (they are replayed at its
  next start), and when several files count something twice (`counted_twice`: a
  copy of a file given beside it, a background response polled on several replicas).

`meter reprice` (`meter.report.reprice`) prints `repriced N of M rows; cost +$X`
(M: rows with usage in the window); `--dry-run` says the same without writing.
A DuckDB file open in a running meter is refused (stop it first); a PostgreSQL
ledger can be repriced live.

Every failure is one `CommandError` line (exit 2): bad arguments, a ledger that
cannot be opened or read, a price config that does not load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..command import CommandError
from ..config import Settings, load_settings, redact_url
from ..ledger import HAS_USAGE_SQL, LedgerReadError, Store, is_postgres_url, open_reader
from .client import report_url
from .query import filter_sql, has_session_column, one_line, report
from .render import render
from .window import GROUP_FIELDS, ReportArgs, ReportError, parse_args, parse_window

_WARNING = "meter: warning: the report may be incomplete: "


def _load_settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return load_settings({"config": args.config, **extra})


def report_ledgers(ledgers: Sequence[str], args: ReportArgs, key_names: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The report over `--ledger` values (DuckDB files read as one, or one PostgreSQL URL),
    keys named by `key_names` (the `--config` in force), and warnings of what several
    files count twice (`counted_twice`)."""
    try:
        store = open_reader(ledgers)
    except LedgerReadError as exc:
        raise CommandError(str(exc)) from None
    try:
        rows = report(store, args, key_names)
        return rows, (counted_twice(store, args, key_names) if len(ledgers) > 1 else [])
    except Exception as exc:  # noqa: BLE001 -- whatever the store raises is one line, never a traceback
        raise CommandError(f"ledger: cannot report from {', '.join(map(redact_url, ledgers))}: {one_line(exc)}") from None
    finally:
        store.close()


def counted_twice(store: Store, args: ReportArgs, key_names: Mapping[str, str] | None) -> list[str]:
    """What several files read as one sum more than once, among the rows the report selects.

    - a request (its id) in more than one file: replicas never share one, but a copy of a
      file given beside it (a backup, a file moved between machines) shares them all;
    - a background response whose usage is on rows of more than one file: each replica's
      ledger keeps it once, on its own first row after the end, so polls that reached
      several replicas put it in each of their files.
    """
    condition, params = filter_sql(store.dialect, args.since, args.until, args.where, key_names, has_session_column(store, args))
    sql = (
        f"SELECT (SELECT count(*) FROM (SELECT id FROM requests WHERE {condition} GROUP BY id HAVING count(*) > 1) AS ids), "
        f"(SELECT count(*) FROM (SELECT response_id FROM requests WHERE {condition} AND background AND response_id IS NOT NULL "
        f"AND {HAS_USAGE_SQL} GROUP BY response_id HAVING count(DISTINCT id) > 1) AS responses)"
    )
    _, rows = store.query(sql, params)
    shared, responses = (int(n) for n in rows[0])
    warnings = []
    if shared:
        warnings.append(f"{shared} requests are in more than one of the ledgers given (a copy of one?) and are counted once per file")
    if responses:
        warnings.append(
            f"{responses} background responses have their usage in more than one of the ledgers given (polls reached several replicas) and it is counted once per file"
        )
    return warnings


def run_report(args: argparse.Namespace) -> int:
    try:
        wanted = parse_args(args.by, args.since, args.until, args.where, args.top)
        if args.url:
            # The running meter names the keys from its own config; a --config given
            # here names them over it (the flag only: METER_CONFIG is the meter's own).
            names = _load_settings(args).keys if args.config else None
            rows, pending = report_url(args.url, wanted, key_names=names)
            if pending is not None:
                # stdout keeps its shape for scripts; the caveat goes to stderr, once.
                print(f"{_WARNING}the ledger is failing or behind, {pending} records not yet in it", file=sys.stderr)
        else:
            settings = _load_settings(args)
            ledgers = args.ledger or [settings.ledger]
            rows, twice = report_ledgers(ledgers, wanted, settings.keys)
            for warning in twice:
                print(f"meter: warning: {warning}", file=sys.stderr)
            for warning in spool_warnings(ledgers, settings):
                print(_WARNING + warning, file=sys.stderr)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    sys.stdout.write(render(rows, wanted.by, args.format))
    return 0


def count_lines(path: Path) -> int | None:
    """Newlines in a file, read in 1 MiB blocks (a spool may hold millions of records); None if absent."""
    try:
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return None


def spool_warnings(ledgers: Sequence[str], settings: Settings) -> list[str]:
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
    # Here, not at the top: the price data and its package (~30 ms, ~20 MiB) are
    # loaded by `meter reprice` alone, not by every `meter` command that builds the parser.
    from ..prices import Pricer
    from .reprice import Repricer, format_delta, reprice

    try:
        since, _ = parse_window(args.since, None)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    settings = _load_settings(args, upstream=args.upstream)
    ledger = args.ledger or settings.ledger
    try:
        pricer = Pricer(provider_id=settings.price_provider, upstream_url=settings.upstream, overrides=settings.price_overrides)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        store = open_reader([ledger], writable=not args.dry_run)
    except LedgerReadError as exc:
        raise CommandError(str(exc)) from None
    try:
        tally = reprice(store, since, Repricer(pricer), dry_run=args.dry_run)
    except Exception as exc:  # noqa: BLE001 -- whatever the store raises is one line, never a traceback
        raise CommandError(f"ledger: cannot reprice {redact_url(ledger)}: {one_line(exc)}") from None
    finally:
        store.close()
    verb = "would reprice" if args.dry_run else "repriced"
    print(f"{verb} {tally.changed} of {tally.seen} rows; cost {format_delta(tally.delta)}")
    return 0


def add_report_commands(subparsers: Any) -> None:
    """Called by `meter.cli.build_parser`: adds `report` and `reprice`."""
    report_cmd = subparsers.add_parser(
        "report",
        help="sum requests, tokens and cost by key, model, tier, ...",
        description=(
            "Sum the ledger's requests, tokens and cost per group. WHEN is an ISO date or time "
            "(times without an offset are UTC; --until with a bare date includes that day) or a span back from now (7d, 24h, 30m)."
        ),
    )
    source = report_cmd.add_mutually_exclusive_group()
    source.add_argument(
        "--ledger",
        action="append",
        metavar="PATH_OR_URL",
        help="DuckDB file or postgresql:// URL; repeat to report over several replicas' files as one (env METER_LEDGER; default: the configured ledger)",
    )
    source.add_argument(
        "--url",
        metavar="http://ADMIN",
        help="ask a running meter's admin address (its DuckDB file is held open); sends METER_ADMIN_TOKEN as a bearer token when set",
    )
    report_cmd.add_argument("--since", metavar="WHEN", help="from this time on (inclusive)")
    report_cmd.add_argument("--until", metavar="WHEN", help="up to this time (exclusive)")
    report_cmd.add_argument("--by", action="append", metavar="FIELDS", help=f"group by a comma-separated list of: {','.join(GROUP_FIELDS)},tag:NAME")
    report_cmd.add_argument(
        "--where",
        action="append",
        metavar="FIELD=VALUE",
        help="only rows whose FIELD (as in --by; key by name or key_id) is VALUE, an empty VALUE meaning none; repeat to AND several",
    )
    report_cmd.add_argument("--top", metavar="N", help="only the N groups of highest cost (then requests), highest first")
    report_cmd.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table; csv and json have no total row)")
    report_cmd.add_argument("--config", help="TOML config whose [keys] name key_ids (env METER_CONFIG); with --url its names override the meter's own")
    report_cmd.set_defaults(handler=run_report)

    reprice_cmd = subparsers.add_parser(
        "reprice",
        help="recompute cost_usd from the stored usage with today's prices",
        description="Recompute cost_usd of every row with usage (from --since on) with today's prices and config overrides; rewrites only rows whose cost changed.",
    )
    reprice_cmd.add_argument("--ledger", metavar="PATH_OR_URL", help="DuckDB file or postgresql:// URL (env METER_LEDGER; default: the configured ledger; a DuckDB file must not be open in a running meter)")
    reprice_cmd.add_argument("--since", metavar="WHEN", help="only rows from this time on: ISO date/time or a span back from now (7d, 24h)")
    reprice_cmd.add_argument("--config", help="TOML config: [prices] provider and overrides (env METER_CONFIG)")
    reprice_cmd.add_argument("--upstream", help="upstream URL whose provider's prices apply (env METER_UPSTREAM; default https://api.openai.com)")
    reprice_cmd.add_argument("--dry-run", dest="dry_run", action="store_true", help="say what would change without writing")
    reprice_cmd.set_defaults(handler=run_reprice)
