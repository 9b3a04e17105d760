"""The repository's own reference is complete: users read docs/, not the code.

What is checked is what meter really makes, not a list kept beside the code:

- a real `meter serve` runs against the fake provider, serves a few requests
  chosen to give every labelled metric family a series, is scraped and stopped;
  every family it exposes (`# TYPE`), with its type, and every label of its
  series must be in docs/metrics.md, each label also in its table of values;
- the DuckDB ledger it made is opened: every table and view, and every column
  with its type, must be in docs/ledger.md;
- every command and option `meter.cli.build_parser()` accepts must be in
  docs/cli.md, under the command's own heading; every `meter serve` flag with
  its `METER_*` variable;
- every setting of the `Settings` model (the config file's keys), every price
  override key, every `METER_*` variable a setting or a command's help names
  must be in docs/config.md.

A new column, metric, label, flag or setting that the docs do not name fails here.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import typing
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meter.cli import build_parser
from meter.config import Settings, settings_from_env

from .conftest import SECRET_KEY, MeterProcess, UpstreamProcess

DOCS = Path(__file__).resolve().parents[1] / "docs"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# information_schema spells some DuckDB types out; the docs use the names one writes in SQL.
TYPE_NAMES = {"TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ"}


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, name: str) -> str:
    """The text under the first heading that is `name` or names it in backticks, down to
    the next heading of the same or a higher level ("" when there is no such heading)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        heading = re.match(r"(#+) (.*)", line)
        if heading and (f"`{name}`" in line or heading.group(2).strip() == name):
            level = len(heading.group(1))
            body = []
            for following in lines[i + 1 :]:
                other = re.match(r"(#+) ", following)
                if other and len(other.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body)
    return ""


def table_row(text: str, name: str) -> list[str] | None:
    """The cells of the Markdown table row whose first cell is `name` in backticks."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == f"`{name}`":
            return cells
    return None


def named(text: str, name: str) -> bool:
    """`name` in backticks, alone or followed by an argument (`--since WHEN`)."""
    return re.search(rf"`{re.escape(name)}[` ]", text) is not None


# --- a real meter: its metrics and its ledger -------------------------------------------


@dataclass
class Served:
    exposition: str
    ledger: Path


def _post(url: str, path: str, body: dict[str, typing.Any], headers: dict[str, str] | None = None) -> None:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()


def scrape_once_written(admin_url: str, records: int, timeout: float = 20.0) -> str:
    """`/metrics` once the ledger has written `records`: what its writer counts
    (truncated values) is then in the scrape."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(admin_url + "/metrics", timeout=30) as answer:
            exposition = answer.read().decode()
        written = re.search(r"^meter_ledger_written_records_total (\S+)$", exposition, re.MULTILINE)
        if (written and float(written.group(1)) >= records) or time.monotonic() > deadline:
            return exposition
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("docs")
    ledger = tmp / "ledger.duckdb"
    meter = MeterProcess(["--upstream", upstream.url, "--ledger", str(ledger)], log_path=tmp / "meter.log").start()
    try:
        usage = {
            "input_tokens": 40,
            "cached_tokens": 10,
            "cache_write_tokens": 5,
            "output_tokens": 20,
            "reasoning_tokens": 8,
            "web_search_calls": 1,
        }
        miss = {"type": "cache_miss", "reason": "prefix_changed", "cache_missed_tokens": 30}
        # Priced, with every token type, a web search and a cache miss.
        _post(meter.url, "/v1/responses", {"model": "gpt-4o", "input": "hi"},
              {"x-fake-usage": json.dumps(usage), "x-fake-cache-diagnostics": json.dumps(miss)})  # fmt: skip
        # A stream: time to first token.
        _post(meter.url, "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True})
        # Unpriced (no such model), with usage that breaks its arithmetic (an anomaly).
        _post(meter.url, "/v1/responses", {"model": "no-such-model", "input": "hi"},
              {"x-fake-usage": json.dumps({"input_tokens": 10, "output_tokens": 5, "total_tokens": 99})})  # fmt: skip
        # Unmetered: a Chat Completions stream without include_usage.
        _post(meter.url, "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        # A model name longer than the ledger keeps: a truncated value.
        _post(meter.url, "/v1/responses", {"model": "m" * 300, "input": "hi"})
        exposition = scrape_once_written(meter.admin_url, records=5)
    finally:
        meter.stop()
    yield Served(exposition, ledger)


def exposed_families(exposition: str) -> dict[str, str]:
    """Family name -> type, as `# TYPE` lines name them (counters with `_total`)."""
    return {line.split()[2]: line.split()[3] for line in exposition.splitlines() if line.startswith("# TYPE ")}


def exposed_labels(exposition: str, families: dict[str, str]) -> dict[str, set[str]]:
    """Family name -> the label names of its series (`le` is the histogram's own)."""
    labels: dict[str, set[str]] = {name: set() for name in families}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            owner = next(
                (name for name in families
                 if sample.name == name or (families[name] == "histogram" and sample.name in {name + s for s in HISTOGRAM_SUFFIXES})),
                sample.name,
            )  # fmt: skip
            labels.setdefault(owner, set()).update(set(sample.labels) - {"le"})
    return labels


def test_every_metric_family_is_in_the_metrics_doc_with_its_type_and_labels(served: Served) -> None:
    families = exposed_families(served.exposition)
    labels = exposed_labels(served.exposition, families)
    assert "meter_requests_total" in families and labels["meter_requests_total"], "the scrape saw no request: the check would prove nothing"
    families_table = section(doc("metrics.md"), "Families")
    missing = []
    for name, kind in families.items():
        row = table_row(families_table, name)
        if row is None:
            missing.append(f"{name} (no row)")
            continue
        if row[1] != kind:
            missing.append(f"{name}: type {kind}, the doc says {row[1]}")
        missing += [f"{name}: label {label}" for label in sorted(labels[name]) if f"`{label}`" not in row[2]]
    assert not missing, f"missing from docs/metrics.md: {missing}"


def test_every_metric_label_says_what_it_may_hold(served: Served) -> None:
    families = exposed_families(served.exposition)
    every_label = set().union(*exposed_labels(served.exposition, families).values())
    values = section(doc("metrics.md"), "Labels")
    missing = sorted(label for label in every_label if not re.search(rf"^\| `{label}`", values, re.MULTILINE))
    assert not missing, f"labels without a row in the Labels table of docs/metrics.md: {missing}"


def ledger_schema(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Table or view -> its (column, type), as the ledger `meter serve` made holds them."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = 'main' ORDER BY table_name, ordinal_position"
        ).fetchall()
    finally:
        con.close()
    schema: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in rows:
        schema.setdefault(table, []).append((column, TYPE_NAMES.get(kind, kind)))
    return schema


def test_every_ledger_table_and_column_is_in_the_ledger_doc_with_its_type(served: Served) -> None:
    schema = ledger_schema(served.ledger)
    assert {"requests", "usage_claims"} <= set(schema), f"not a ledger as meter serve makes it: {sorted(schema)}"
    text = doc("ledger.md")
    missing = []
    for table, columns in schema.items():
        body = section(text, table)
        if not body:
            missing.append(f"{table} (no heading naming it)")
            continue
        for column, kind in columns:
            row = table_row(body, column)
            if row is None:
                missing.append(f"{table}.{column} (no row)")
            elif f"`{kind}`" not in row[1]:
                missing.append(f"{table}.{column}: type {kind}, the doc says {row[1]}")
    assert not missing, f"missing from docs/ledger.md: {missing}"


# --- the command line ----------------------------------------------------------------------


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], list[str], bool]]:
    """(command path, its options, whether it is a leaf) for `meter` and every subcommand."""
    actions = parser._actions  # argparse has no public walk of its commands and options
    subparsers = [a for a in actions if isinstance(a, argparse._SubParsersAction)]
    options = sorted(opt for a in actions for opt in a.option_strings if opt not in ("-h", "--help"))
    yield path, options, not subparsers
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from commands(sub, (*path, name))


def help_texts(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        yield action.help or ""
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub.description or ""
                yield from help_texts(sub)


def serve_flags() -> list[str]:
    return next(options for path, options, _ in commands(build_parser()) if path == ("serve",))


def variable(flag: str) -> str:
    return "METER_" + flag.removeprefix("--").replace("-", "_").upper()


def test_every_command_and_option_is_in_the_cli_doc() -> None:
    text = doc("cli.md")
    missing = []
    for path, options, leaf in commands(build_parser()):
        command = " ".join(("meter", *path))
        body = section(text, command) if leaf else text
        if not body:
            missing.append(f"{command} (no heading naming it)")
            continue
        missing += [f"{command} {opt}" for opt in options if not named(body, opt)]
    assert not missing, f"missing from docs/cli.md: {missing}"


@pytest.mark.parametrize("flag", serve_flags())
def test_every_serve_flag_and_its_variable_is_in_the_cli_and_config_docs(flag: str) -> None:
    cli_serve = section(doc("cli.md"), "meter serve")
    config = doc("config.md")
    assert named(cli_serve, flag), f"{flag} is missing from the `meter serve` table of docs/cli.md"
    assert f"`{variable(flag)}`" in cli_serve, f"{variable(flag)} is missing from the `meter serve` table of docs/cli.md"
    assert named(config, flag), f"{flag} is missing from docs/config.md"
    assert f"`{variable(flag)}`" in config, f"{variable(flag)} is missing from docs/config.md"


# --- settings ------------------------------------------------------------------------------


def test_every_setting_and_its_variable_is_in_the_config_doc() -> None:
    text = doc("config.md")
    missing = [f"setting {name}" for name in Settings.model_fields if f"`{name}`" not in text]
    for name in Settings.model_fields:
        env = "METER_" + name.upper()
        if settings_from_env({env: "1"}) and f"`{env}`" not in text:  # the setting has a variable
            missing.append(env)
    for used in sorted({m for h in help_texts(build_parser()) for m in re.findall(r"METER_[A-Z_]+", h)}):
        if f"`{used}`" not in text:
            missing.append(f"{used} (named in --help)")
    assert not missing, f"missing from docs/config.md: {missing}"


def test_every_price_override_key_is_in_the_config_doc() -> None:
    _, override = typing.get_args(Settings.model_fields["price_overrides"].annotation)
    prices = section(doc("config.md"), "Prices")
    missing = [name for name in override.model_fields if table_row(prices, name) is None]
    assert not missing, f'[prices."model"] keys missing from the Prices table of docs/config.md: {missing}'
    assert "`[keys]`" in doc("config.md") and "`[prices]" in doc("config.md")


# --- the reverse: what the docs name exists, and the pages that list commands list them all --


def leaf_commands() -> list[tuple[str, list[str]]]:
    return [(" ".join(("meter", *path)), options) for path, options, leaf in commands(build_parser()) if leaf]


def test_every_option_the_cli_doc_names_exists() -> None:
    # The other direction of the check above: an option renamed or removed in the code
    # stays in a table a user copies from.
    text = doc("cli.md")
    stale = []
    seen = 0
    for command, options in leaf_commands():
        documented = set(re.findall(r"^\| `(--[a-z][a-z-]*)", section(text, command), re.MULTILINE))
        seen += len(documented)
        stale += [f"{command} {option}" for option in sorted(documented - set(options))]
    assert seen >= 40, "too few option rows found: the check would prove nothing"
    assert not stale, f"docs/cli.md names options the command does not take: {stale}"


def test_every_setting_and_variable_the_docs_name_exists() -> None:
    settings = set(Settings.model_fields)
    config = doc("config.md")
    rows = re.findall(r"^\| `([a-z_]+)` \| `--", section(config, "Settings"), re.MULTILINE)
    assert rows, "no setting rows found: the check would prove nothing"
    stale = [f"setting {name}" for name in rows if name not in settings]
    variables = {"METER_" + name.upper() for name in settings}
    readme = (DOCS.parent / "README.md").read_text()
    for page, text in [("README.md", readme)] + [(path.name, path.read_text()) for path in sorted(DOCS.glob("*.md"))]:
        stale += [f"{page}: {name}" for name in sorted(set(re.findall(r"\bMETER_[A-Z_]*[A-Z]\b", text)) - variables)]
    assert not stale, f"the docs name settings or variables meter does not have: {stale}"


def test_the_cli_doc_synopsis_and_the_docs_index_name_every_command() -> None:
    synopsis = re.search(r"```\n(meter .*?)```", doc("cli.md"), re.DOTALL)
    assert synopsis, "docs/cli.md has no synopsis block"
    index_row = next((line for line in doc("README.md").splitlines() if line.startswith("| [cli.md]")), "")
    missing = []
    for command, _ in leaf_commands():
        if not re.search(rf"^{re.escape(command)}\b", synopsis.group(1), re.MULTILINE):
            missing.append(f"docs/cli.md synopsis: {command}")
        if f"`{command}`" not in index_row:
            missing.append(f"docs/README.md's cli.md row: {command}")
    assert not missing, missing


def test_each_clients_variable_row_names_every_command_that_reads_it() -> None:
    table = section(doc("config.md"), "Variables the clients read")
    parsers = {" ".join(("meter", *path)): sub for path, sub in subparsers(build_parser())}
    missing = []
    for command, _ in leaf_commands():
        if command == "meter serve":
            continue
        parser = parsers[command]
        for variable in sorted({v for h in help_texts(parser) for v in re.findall(r"METER_[A-Z_]+", h)}):
            row = next((line for line in table.splitlines() if line.startswith("|") and f"`{variable}`" in line.split("|")[1]), None)
            if row is None or f"`{command}" not in row.split("|")[2]:
                missing.append(f"{variable}: {command}")
    assert not missing, f"the 'Variables the clients read' table of docs/config.md misses: {missing}"


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))


def documented_default(cell: str) -> str:
    """The default a Settings row shows: its first `value` (`none`/`off` as written)."""
    shown = re.match(r"`([^`]*)`", cell)
    return shown.group(1) if shown else cell.split()[0]


def code_default(value: object) -> str:
    if value is None or value == ():
        return "none"
    if value is False:
        return "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_settings_default_in_the_config_doc_is_the_codes() -> None:
    table = section(doc("config.md"), "Settings")
    wrong = []
    checked = 0
    for name, field in Settings.model_fields.items():
        row = table_row(table, name)
        if row is None or name in ("spool", "reconcile_every"):  # spool: beside the ledger; reconcile_every: None is off
            continue
        checked += 1
        if documented_default(row[3]) != code_default(field.default):
            wrong.append(f"{name}: the doc says {row[3]}, the code {field.default!r}")
    assert checked >= 20 and not wrong, wrong


def test_every_table_in_the_docs_has_its_header() -> None:
    # A paragraph dropped into a table leaves the rows after it as text with pipes.
    broken = []
    for path in [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]:
        lines = path.read_text().splitlines()
        fenced = False
        for i, line in enumerate(lines):
            fenced ^= line.startswith("```")
            starts_table = line.startswith("|") and not fenced and (i == 0 or not lines[i - 1].startswith("|"))
            if starts_table and not (i + 1 < len(lines) and re.match(r"\|( *:?-+:? *\|)+$", lines[i + 1])):
                broken.append(f"{path.name}:{i + 1}: {line[:60]}")
    assert not broken, f"table rows without a header and separator line: {broken}"


def test_every_default_serve_help_states_is_the_codes() -> None:
    # `meter serve --help` is the other place a default is written down by hand.
    serve = dict(subparsers(build_parser()))[("serve",)]
    wrong = []
    checked = 0
    for action in serve._actions:
        stated = re.search(r"default ([^;)]*)\)", action.help or "")
        if not stated or action.dest not in Settings.model_fields or action.dest in ("spool", "reconcile_every"):
            continue
        checked += 1
        mib = re.fullmatch(r"(\d+) MiB", stated.group(1))
        shown = str(int(mib.group(1)) << 20) if mib else stated.group(1)
        if shown != code_default(Settings.model_fields[action.dest].default):
            wrong.append(f"--{action.dest}: help says {stated.group(1)}, the code {Settings.model_fields[action.dest].default!r}")
    assert checked >= 18 and not wrong, (checked, wrong)
