"""The `meter` command: serve, report, reprice, keys.

Every command follows one rule for bad input (`meter.command`): one line on
stderr naming what is wrong, exit status 2, no traceback.  `report` and
`reprice` are wired by `meter.report.commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .budgets.command import add_budgets_command
from .command import EXIT_USAGE, CommandError
from .config import SettingError, load_settings, misspelt_variables
from .reconcile.command import add_reconcile_command
from .report.commands import add_report_commands
from .report.sql_command import add_sql_command
from .retention import add_prune_command


class Parser(argparse.ArgumentParser):
    """Usage errors in the one form every other error has: `meter: error: ...`, the
    command named after it (`meter: error: serve: ...`), one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("meter").strip()
        self.exit(EXIT_USAGE, f"meter: error: {command + ': ' if command else ''}{message}\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        # argparse reports what no parser took from the top parser, so `serve --upstrem`
        # named no command and no option to use instead: the command that was given
        # reports it, with the option nearest what was typed.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = chosen_command(self, parsed)
            hint = nearest_option(command, extras)
            help_line = f"`{command.prog} --help` lists the options"
            command.error(f"unrecognized arguments: {' '.join(extras)} ({f'did you mean {hint}? ' if hint else ''}{help_line})")
        return parsed


def chosen_command(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)command parser the parsed arguments went through."""
    for action in parser._actions:  # argparse has no public walk of its subcommands
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
            if chosen is not None:
                return chosen_command(chosen, parsed)
    return parser


def nearest_option(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str | None:
    """The option of `parser` closest to the first unknown one given (`--upstrem`), if any is close."""
    flags = [word.partition("=")[0] for word in extras if word.startswith("--")]
    options = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--") and opt != "--help"]
    matches = difflib.get_close_matches(flags[0], options, n=1, cutoff=0.75) if flags else []  # a typo, not any option
    return matches[0] if matches else None


def installed_version() -> str:
    """The installed distribution's version (an editable install's too), else the package's own."""
    from importlib import metadata

    for dist in dict.fromkeys(metadata.packages_distributions().get(__package__ or "meter", [])):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    from . import __version__

    return __version__


class VersionAction(argparse.Action):
    """`--version`: looked up only when asked (scanning the installed distributions takes time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, help="print meter's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(f"meter {installed_version()}")
        parser.exit()


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", help="upstream base URL, path prefix allowed (env METER_UPSTREAM; default https://api.openai.com)")
    p.add_argument("--listen", help="proxy address HOST:PORT (env METER_LISTEN; default 127.0.0.1:8080)")
    p.add_argument("--admin-listen", dest="admin_listen", help="admin address for /metrics, /healthz, /readyz, /api (env METER_ADMIN_LISTEN; default 127.0.0.1:9464)")
    p.add_argument("--ledger", help="DuckDB file or postgresql:// URL (env METER_LEDGER; default meter.duckdb)")
    p.add_argument("--config", help="TOML config file: prices, key names, limits (env METER_CONFIG)")
    p.add_argument("--spool", help="overflow file for records while the ledger is down (env METER_SPOOL; default beside the ledger)")
    p.add_argument("--upstream-timeout", dest="upstream_timeout", type=float, help="seconds of upstream silence before giving up (env METER_UPSTREAM_TIMEOUT; default 600)")
    p.add_argument("--connect-timeout", dest="connect_timeout", type=float, help="seconds to connect to the upstream (env METER_CONNECT_TIMEOUT; default 10)")
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=int, help="largest request body accepted; larger gets 413 (env METER_MAX_REQUEST_BYTES; default 64 MiB)")
    p.add_argument("--max-buffered-request-bytes", dest="max_buffered_request_bytes", type=int, help="request body bytes held at once across all requests; past it 503 (env METER_MAX_BUFFERED_REQUEST_BYTES; default 256 MiB)")
    p.add_argument("--client-timeout", dest="client_timeout", type=float, help="seconds of silence while a client sends its body before 408 (env METER_CLIENT_TIMEOUT; default 60)")
    p.add_argument("--max-metered-bytes", dest="max_metered_bytes", type=int, help="bytes meter holds to meter one answer, decompressed copy or event (env METER_MAX_METERED_BYTES; default 64 MiB)")
    p.add_argument("--max-metered-bytes-total", dest="max_metered_bytes_total", type=int, help="bytes all answers being metered hold whole at once; past it an answer is metered from its ends (env METER_MAX_METERED_BYTES_TOTAL; default 256 MiB)")
    p.add_argument("--admin-token", dest="admin_token", help="Bearer token required on every admin path but /healthz and /readyz (env METER_ADMIN_TOKEN)")
    p.add_argument("--admin-insecure", dest="admin_insecure", action="store_const", const=True, help="serve the admin port on a non-loopback address without a token (env METER_ADMIN_INSECURE=true)")
    p.add_argument("--flush-interval", dest="flush_interval", type=float, help="seconds between ledger batch writes, at most 1 (env METER_FLUSH_INTERVAL; default 0.5)")
    p.add_argument("--ledger-max-pending", dest="ledger_max_pending", type=int, help="records held in memory while the ledger is down before spooling (env METER_LEDGER_MAX_PENDING; default 100000)")
    p.add_argument("--shutdown-grace", dest="shutdown_grace", type=float, help="seconds in-flight requests get to finish on SIGTERM (env METER_SHUTDOWN_GRACE; default 30)")
    p.add_argument("--metrics-max-keys", dest="metrics_max_keys", type=int, help="distinct key label values before further keys count as 'other' (env METER_METRICS_MAX_KEYS; default 100)")
    p.add_argument("--metrics-key-label", dest="metrics_key_label", choices=["on", "off"], help="label metrics by key (env METER_METRICS_KEY_LABEL; default on)")
    p.add_argument("--metrics-tag-labels", dest="metrics_tag_labels", metavar="NAME,...", help="tags whose values label the request, token and cost metrics as tag_NAME (env METER_METRICS_TAG_LABELS; default none)")
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"], help="least severe log lines written to stderr (env METER_LOG_LEVEL; default info)")
    p.add_argument(
        "--access-log",
        dest="access_log",
        action="store_const",
        const=True,
        help="one line per request on the meter.access logger: method, path, status, model, tokens, cost, duration, key_id (env METER_ACCESS_LOG=true; default off)",
    )
    p.add_argument("--reconcile-every", dest="reconcile_every", metavar="INTERVAL", help="reconcile the ledger with the provider's usage and costs every INTERVAL (1h, 30m) as meter_reconcile_* metrics (env METER_RECONCILE_EVERY; default off)")


def build_parser() -> Parser:
    parser = Parser(prog="meter", description="A metering reverse proxy for OpenAI-compatible APIs.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    serve = sub.add_parser("serve", help="run the proxy", description="Forward every request to the upstream unchanged and meter it.")
    _serve_args(serve)
    keys = sub.add_parser("keys", help="key utilities")
    # metavar: the error for `meter keys` alone names the missing command, not the attribute it lands in
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="id", required=True, parser_class=Parser)
    keys_sub.add_parser("id", help="print the key_id of a key read from standard input", description="Reads one API key from standard input and prints its key_id, for naming keys in the config.")
    add_report_commands(sub)
    add_sql_command(sub)
    add_budgets_command(sub)
    add_prune_command(sub)
    add_reconcile_command(sub)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _run_serve(args: argparse.Namespace) -> int:
    from .runtime import event_loop_factory, tune_interpreter
    from .server import Meter, StartupError

    flags = {k: v for k, v in vars(args).items() if k not in ("command",)}
    settings = load_settings(flags)
    _setup_logging(settings.log_level)
    tune_interpreter()
    try:
        meter = Meter(settings)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(meter.run())
    except StartupError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _read_key() -> str:
    """One key from standard input.  At a terminal, asked for and not echoed: run with
    nothing piped in, `meter keys id` waited without a word, and a pasted key stayed
    on the screen and in the terminal's scrollback."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    import getpass

    return getpass.getpass("API key (not shown): ", stream=sys.stderr).strip()


def _run_keys_id() -> int:
    from .identity import key_id

    text = _read_key()
    if not text:
        raise CommandError("keys id: no key on standard input")
    print(key_id(text))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Every file meter makes holds ledger rows or secrets (the ledger, its WAL, a
    # prune's compacted copy, DuckDB's spill files, the spool): owner-only from the
    # moment it exists, however the shell's umask is set.  A file that exists keeps
    # the mode its operator gave it.
    os.umask(0o077)
    # The parser (every command's: 64 KB of objects) is not kept: `serve` runs on
    # inside this call for the process's lifetime.
    args = build_parser().parse_args(argv)
    for warning in misspelt_variables(os.environ):
        print(f"meter: warning: {warning}", file=sys.stderr)
    try:
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "keys":
            return _run_keys_id()
        handler: Any = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args) or 0)
        raise CommandError(f"unknown command {args.command}")
    except (CommandError, SettingError) as exc:
        print(f"meter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
