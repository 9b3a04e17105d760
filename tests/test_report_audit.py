"""Reports asked the same question several ways (`meter report --ledger`, the admin
API, the console's latest requests) over real DuckDB files seeded with meter's own
writer: one key is one name in a report, and the table keeps one line per group."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import unicodedata
from decimal import Decimal
from pathlib import Path

from meter.config import load_settings
from meter.console.api import Console
from meter.ledger import DuckDBStore
from meter.record import Record
from meter.report import ReportAPI
from meter.report.window import parse_args

from .test_report import make_record, report_json, run_meter, seed, write_all

UTC = dt.UTC
DAY1 = dt.datetime(2026, 3, 1, 10, tzinfo=UTC)
DAY2 = DAY1 + dt.timedelta(days=1)


def _renamed_key_records() -> list[Record]:
    """Key k1 used unnamed on day 1 (and for gpt-4o only), then named `team-x` on day 2:
    a ledger reported without the config that named it."""
    key = {"key_id": "k1", "key_hint": "sk-...0001"}
    return [
        make_record(at=DAY1, **key, model="gpt-4o", input_tokens=10, output_tokens=1, cost_usd=Decimal("0.001")),
        make_record(at=DAY2, **key, key_name="team-x", model="gpt-4o-mini", input_tokens=20, output_tokens=2, cost_usd=Decimal("0.002")),
    ]


def _renamed_key_ledger(tmp_path: Path) -> Path:
    return seed(tmp_path / "renamed.duckdb", _renamed_key_records())


def _report(ledger: Path, *args: str) -> list[dict[str, object]]:
    result = run_meter("report", "--ledger", str(ledger), "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_a_key_has_one_name_whatever_else_groups_it(tmp_path: Path) -> None:
    ledger = _renamed_key_ledger(tmp_path)
    assert [r["key"] for r in _report(ledger, "--by", "key")] == ["team-x"]
    # Split by day or model too, the key is still the one group `--by key` names: its
    # day-1 rows (stored before it had a name) are not under its key_id.
    for by in ("key,day", "key,model", "day,key"):
        rows = _report(ledger, "--by", by)
        assert [r["key"] for r in rows] == ["team-x", "team-x"], (by, rows)
    # Filtered by that name, every group it selects shows that name.
    rows = _report(ledger, "--by", "key,day", "--where", "key=team-x")
    assert [(r["key"], r["requests"]) for r in rows] == [("team-x", 1), ("team-x", 1)]


def test_a_key_has_one_name_on_postgresql_too(pg_url: str) -> None:
    from meter.ledger import PostgresStore

    write_all(PostgresStore(pg_url), _renamed_key_records())
    rows = report_json("--ledger", pg_url, "--by", "key,model")
    assert [(r["key"], r["model"]) for r in rows] == [("team-x", "gpt-4o"), ("team-x", "gpt-4o-mini")]


def test_latest_requests_name_keys_as_the_report_does(tmp_path: Path) -> None:
    ledger = _renamed_key_ledger(tmp_path)
    store = DuckDBStore(str(ledger))
    store.open()
    try:
        console = Console(ReportAPI(load_settings({"ledger": str(ledger)}), store, None), token_required=False)
        args = parse_args(None, None, None, ["key=team-x"])
        latest = console.latest(args.since, args.until, args.where, 50)
    finally:
        store.close()
    assert [(r["key"], r["model"]) for r in latest] == [("team-x", "gpt-4o-mini"), ("team-x", "gpt-4o")]


def _odd_names_ledger(tmp_path: Path) -> Path:
    """Key names and tag values a client chose: commas, quotes, a line break, a tab, a
    bell, non-ASCII and wide characters."""
    return seed(tmp_path / "odd.duckdb", [
        make_record(at=DAY1, key_id="k1", key_hint="sk-...0001", key_name='ops, "night"\nshift', model="gpt-4o",
                    input_tokens=10, output_tokens=1, cost_usd=Decimal("0.001"), tags=json.dumps({"team": "a\tb\u0007 é"})),
        make_record(at=DAY1, key_id="k2", key_hint="sk-...0002", key_name="検索チーム", model="gpt-4o",
                    input_tokens=20, output_tokens=2, cost_usd=Decimal("0.002"), tags=json.dumps({"team": "search"})),
    ])


def test_the_table_keeps_one_line_per_group_and_its_columns_aligned(tmp_path: Path) -> None:
    ledger = _odd_names_ledger(tmp_path)
    result = run_meter("report", "--ledger", str(ledger), "--by", "key,tag:team")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5, result.stdout  # header, two groups, the rule, the total
    # A control character is written as its escape, so the line stays one line.
    assert lines[1].startswith('ops, "night"\\nshift  sk-...0001  a\\tb\\x07 é'), lines[1]
    # A wide character takes two columns of a terminal: the hint column starts at the
    # same column on the header and both group lines.
    starts = [_columns(line[: line.index(marker)]) for line, marker in zip(lines, ("key_hint", "sk-...0001", "sk-...0002"))]
    assert len(set(starts)) == 1, (starts, result.stdout)


def _columns(text: str) -> int:
    """Terminal columns of `text`: two for an East Asian wide or full-width character."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def test_csv_and_json_keep_every_character(tmp_path: Path) -> None:
    ledger = _odd_names_ledger(tmp_path)
    import csv
    import io

    result = run_meter("report", "--ledger", str(ledger), "--by", "key,tag:team", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["key"], r["tag:team"]) for r in rows] == [('ops, "night"\nshift', "a\tb\u0007 é"), ("検索チーム", "search")]
    assert [(r["key"], r["tag:team"]) for r in _report(ledger, "--by", "key,tag:team")] == [(row["key"], row["tag:team"]) for row in rows]


def test_meter_sql_writes_a_decimal_inside_a_list_or_struct(tmp_path: Path) -> None:
    ledger = _renamed_key_ledger(tmp_path)
    query = "SELECT list(cost_usd ORDER BY started_at) AS costs, {'most': max(cost_usd)} AS s FROM requests"
    result = run_meter("sql", "--ledger", str(ledger), "--format", "json", query)
    assert result.returncode == 0, result.stderr
    # Exact, as every cost meter writes: never through a float.
    assert json.loads(result.stdout, parse_float=Decimal) == [{"costs": [Decimal("0.001"), Decimal("0.002")], "s": {"most": Decimal("0.002")}}]
    assert '"costs": [0.001000000, 0.002000000]' in result.stdout
    result = run_meter("sql", "--ledger", str(ledger), "--format", "csv", query)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["costs,s", '"[0.001000000, 0.002000000]","{""most"": 0.002000000}"']
    result = run_meter("sql", "--ledger", str(ledger), query)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split() == ["[0.001000000,", "0.002000000]", '{"most":', "0.002000000}"]


def test_meter_sql_table_keeps_one_line_per_row_and_its_columns_aligned(tmp_path: Path) -> None:
    ledger = _odd_names_ledger(tmp_path)
    result = run_meter("sql", "--ledger", str(ledger), "SELECT key_name, key_hint FROM requests ORDER BY key_id")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout  # header, rule, two rows
    assert lines[2].startswith('ops, "night"\\nshift  sk-...0001'), lines[2]
    rows = (lines[0], lines[2], lines[3])
    starts = [_columns(line[: line.index(marker)]) for line, marker in zip(rows, ("key_hint", "sk-...0001", "sk-...0002"))]
    assert len(set(starts)) == 1, (starts, result.stdout)


def test_a_request_in_two_of_the_ledgers_given_is_warned_of(tmp_path: Path) -> None:
    ledger = _renamed_key_ledger(tmp_path)
    copy = tmp_path / "copy.duckdb"
    shutil.copy(ledger, copy)  # a backup given beside the file it copies
    other = seed(tmp_path / "replica2.duckdb", [make_record(at=DAY1, model="gpt-4o", input_tokens=1, output_tokens=1)])
    # Replicas' own files share no request: nothing to say.
    result = run_meter("report", "--ledger", str(ledger), "--ledger", str(other), "--format", "json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout)[0]["requests"] == 3
    result = run_meter("report", "--ledger", str(ledger), "--ledger", str(copy), "--ledger", str(other), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["requests"] == 5  # stdout keeps its shape
    warning = "meter: warning: 2 requests are in more than one of the ledgers given (a copy of one?) and are counted once per file"
    assert result.stderr.splitlines() == [warning]
    # Only the rows the report selects: day 1 holds one of them.
    result = run_meter("report", "--ledger", str(ledger), "--ledger", str(copy), "--until", DAY1.date().isoformat())
    assert result.returncode == 0, result.stderr
    assert "1 requests are in more than one" in result.stderr


def test_a_background_response_whose_usage_two_replicas_kept_is_warned_of(tmp_path: Path) -> None:
    """Each replica keeps a background response's usage on its own first row after the end
    (its ledger's claim): polls that reached both put it in both files."""
    poll = {"model": "gpt-4o", "background": True, "response_id": "resp_shared", "method": "GET", "path": "/v1/responses/resp_shared",
            "endpoint": "responses.retrieve", "input_tokens": 100, "output_tokens": 10, "cost_usd": Decimal("0.0004")}
    first = seed(tmp_path / "replica1.duckdb", [make_record(at=DAY1, **poll)])
    second = seed(tmp_path / "replica2.duckdb", [make_record(at=DAY1 + dt.timedelta(seconds=5), **poll),
                                                 make_record(at=DAY1, model="gpt-4o", input_tokens=1, output_tokens=1)])
    result = run_meter("report", "--ledger", str(first), "--ledger", str(second), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["input_tokens"] == 201  # what the files hold
    assert result.stderr.splitlines() == [
        ("meter: warning: 1 background responses have their usage in more than one of the ledgers given"
        " (polls reached several replicas) and it is counted once per file")
    ]


def test_stored_names_are_asked_only_for_the_keys_a_page_shows(tmp_path: Path) -> None:
    """The latest requests name their keys over the whole window, but only the page's
    keys are looked up: every key of a busy week grouped per page load ran in the ledger
    process, beside its writes."""
    from meter.report.query import stored_key_names_sql

    records = [*_renamed_key_records(), make_record(at=DAY2, key_id="k2", key_hint="sk-...0002", key_name="team-y", model="gpt-4o")]
    ledger = seed(tmp_path / "two.duckdb", records)
    store = DuckDBStore(str(ledger))
    store.open()
    try:
        every = dict(store.query(*stored_key_names_sql("duckdb"))[1])
        only = dict(store.query(*stored_key_names_sql("duckdb", only=["k1"]))[1])
        none = store.query(*stored_key_names_sql("duckdb", only=[]))[1]
    finally:
        store.close()
    assert every == {"k1": "team-x", "k2": "team-y"} and only == {"k1": "team-x"} and none == []
