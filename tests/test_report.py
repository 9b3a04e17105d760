"""`meter report` (SPEC §8) on real DuckDB files, a real PostgreSQL ledger and a running meter.

The ledger is seeded with meter's own writer (`DuckDBStore.write` of `Record`s);
every report is checked against totals summed by hand (the literal tables
below) or by a deliberately naive reference aggregation over the seeded rows.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meter.ledger import DuckDBStore
from meter.record import Record
from meter.report import GROUP_FIELDS, METRIC_COLUMNS, output_columns, parse_when, report_sql

from .conftest import ROOT, free_port, ledger_rows
from .redirecting import redirect_elsewhere, run_meter_env

UTC = dt.UTC
D1 = dt.datetime(2026, 3, 1, tzinfo=UTC)
D2 = D1 + dt.timedelta(days=1)

KEY_A = "sk-report-key-aaaa-0001"
KEY_B = "sk-report-key-bbbb-0002"
ID_A = hashlib.sha256(KEY_A.encode()).hexdigest()[:16]
ID_B = hashlib.sha256(KEY_B.encode()).hexdigest()[:16]
HINT_A = "sk-..." + KEY_A[-4:]
HINT_B = "sk-..." + KEY_B[-4:]


# --- helpers shared with test_reprice / test_keys -----------------------------------


def run_meter(*args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meter", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, input=stdin)


async def arun_meter(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m meter ...` without blocking the event loop (a meter may be serving in it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meter", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def make_record(**fields: Any) -> Record:
    started = fields.pop("at", None)
    base: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "started_at": started.timestamp() if started is not None else D1.timestamp(),
        "method": "POST",
        "path": "/v1/responses",
        "endpoint": "responses",
        "status_code": 200,
    }
    base.update(fields)
    base.setdefault("finished_at", base["started_at"] + 1.0)
    if base.get("input_tokens") is not None and "total_tokens" not in fields:
        base["total_tokens"] = base["input_tokens"] + (base.get("output_tokens") or 0)
    return Record(**base)


def write_all(store: Any, records: Iterable[Record]) -> None:
    """Open `store` (DuckDB or PostgreSQL), write `records` in one batch, close it."""
    store.open()
    try:
        store.write(list(records))
    finally:
        store.close()


def seed(path: Path | str, records: Iterable[Record]) -> Path:
    write_all(DuckDBStore(str(path)), records)
    return Path(path)


def report_json(*args: str) -> list[dict[str, Any]]:
    result = run_meter("report", "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout, parse_float=Decimal)


def run_meters(*arg_lists: Sequence[str], timeout: float = 60) -> list[subprocess.CompletedProcess[str]]:
    """Several `python -m meter ...` processes at once (each a real CLI run), their results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda args: run_meter(*args, timeout=timeout), arg_lists))


def reports_json(*arg_lists: Sequence[str]) -> list[list[dict[str, Any]]]:
    """Several `meter report --format json` processes at once (each is a real CLI run)."""
    results = run_meters(*(["report", "--format", "json", *args] for args in arg_lists))
    for result in results:
        assert result.returncode == 0, result.stderr
    return [json.loads(result.stdout, parse_float=Decimal) for result in results]


# --- the seeded ledger ---------------------------------------------------------------


def seeded_records() -> list[Record]:
    a = {"key_id": ID_A, "key_hint": HINT_A, "key_name": "team-a"}
    b = {"key_id": ID_B, "key_hint": HINT_B}
    records = [
        # day 1
        make_record(at=D1.replace(hour=10, minute=15), **a, model_requested="gpt-4o", model="gpt-4o", service_tier="default", project="proj_a", user_id="alice",
                    input_tokens=1000, cached_tokens=200, cache_write_tokens=0, output_tokens=300, reasoning_tokens=100, web_search_calls=2, cost_usd=Decimal("0.004000000")),
        make_record(at=D1.replace(hour=10, minute=40), **a, model="gpt-4o", service_tier="flex", project="proj_a", user_id="bob",
                    input_tokens=500, cached_tokens=0, cache_write_tokens=50, output_tokens=100, reasoning_tokens=0, cost_usd=Decimal("0.001250000")),
        make_record(at=D1.replace(hour=11, minute=5), **b, path="/v1/chat/completions", endpoint="chat.completions", model="gpt-4o-mini", service_tier="default",
                    project="proj_b", user_id="alice", input_tokens=2000, cached_tokens=1000, output_tokens=400, reasoning_tokens=0, cost_usd=Decimal("0.000615000")),
        make_record(at=D1.replace(hour=11, minute=30), **b, path="/v1/chat/completions", endpoint="chat.completions", model="gpt-4o-mini", service_tier="priority",
                    input_tokens=100, output_tokens=20, cost_usd=None),  # usage without a price: unpriced
        make_record(at=D1.replace(hour=23, minute=59, second=59), model_requested="gpt-4o", status_code=None, outcome="upstream_unreachable"),  # no key, no model served
        # day 2
        make_record(at=D2.replace(minute=10), **a, path="/v1/embeddings", endpoint="embeddings", model="text-embedding-3-small", project="proj_a", user_id="carol",
                    input_tokens=800, total_tokens=800, cost_usd=Decimal("0.000016000")),
        make_record(at=D2.replace(hour=1), **b, model="gpt-4o", service_tier="default", project="proj_b", user_id="alice", outcome="incomplete",
                    input_tokens=300, cached_tokens=0, output_tokens=50, reasoning_tokens=20, web_search_calls=1, cost_usd=Decimal("0.010000000")),
        make_record(at=D2.replace(hour=1, minute=20), **a, method="GET", path="/v1/models", endpoint="other"),
        make_record(at=D2.replace(hour=2), **b, model_requested="gpt-4o", status_code=429, outcome="error", project="proj_b", user_id="bob", error_type="rate_limit_exceeded"),
        make_record(at=D2.replace(hour=2, minute=30), **a, model_requested="gpt-4o", model="gpt-4o", background=True, outcome="in_progress", project="proj_a", user_id="alice"),
    ]
    for record, (session, tags) in zip(records, ATTRIBUTION):
        record.session_id, record.tags = session, tags
    return records


# Each seeded row's session_id and tags (JSON text as the ledger holds it): tags
# missing, empty, not an object, a number, and a name in another case (tags are
# read by their lower-case name, as meter stores header tags).
ATTRIBUTION: list[tuple[str | None, str | None]] = [
    ("s1", '{"team": "search", "feature": "autocomplete"}'),
    ("s1", '{"team": "search"}'),
    ("s2", '{"team": "ads", "feature": "autocomplete"}'),
    (None, '{"team": ""}'),
    (None, None),
    ("s3", '"not-an-object"'),
    ("s2", '{"team": "ads", "n": 5}'),
    (None, "[1, 2]"),
    ("s2", None),
    ("s1", '{"Team": "upper"}'),
]


def totals(requests: int, inp: int, cached: int, cw: int, out: int, reasoning: int, ws: int, cost: str | None, unpriced: int, errors: int, unmetered: int = 0) -> dict[str, Any]:
    """A report row's numbers; `cost` None: no row of the group has a price."""
    values = dict(zip(METRIC_COLUMNS, (requests, inp, cached, cw, out, reasoning, ws, None if cost is None else Decimal(cost), unpriced)))
    return {**values, "unmetered_requests": unmetered, "errors": errors}


# Summed by hand from the ten rows above.
BY_KEY = [
    {"key": ID_B, "key_hint": HINT_B, **totals(4, 2400, 1000, 0, 470, 20, 1, "0.010615000", 1, 2)},
    {"key": "team-a", "key_hint": HINT_A, **totals(5, 2300, 200, 50, 400, 100, 2, "0.005266000", 0, 0)},
    {"key": None, "key_hint": None, **totals(1, 0, 0, 0, 0, 0, 0, None, 0, 1)},  # no price on any row: no cost, not 0
]
BY_MODEL = [
    {"model": "gpt-4o", **totals(6, 1800, 200, 50, 450, 120, 3, "0.015250000", 0, 3)},
    {"model": "gpt-4o-mini", **totals(2, 2100, 1000, 0, 420, 0, 0, "0.000615000", 1, 0)},
    {"model": "text-embedding-3-small", **totals(1, 800, 0, 0, 0, 0, 0, "0.000016000", 0, 0)},
    {"model": None, **totals(1, 0, 0, 0, 0, 0, 0, None, 0, 0)},
]
BY_TIER = [
    {"tier": "default", **totals(3, 3300, 1200, 0, 750, 120, 3, "0.014615000", 0, 1)},
    {"tier": "flex", **totals(1, 500, 0, 50, 100, 0, 0, "0.001250000", 0, 0)},
    {"tier": "priority", **totals(1, 100, 0, 0, 20, 0, 0, None, 1, 0)},
    {"tier": None, **totals(5, 800, 0, 0, 0, 0, 0, "0.000016000", 0, 2)},
]
BY_DAY = [
    {"day": "2026-03-01", **totals(5, 3600, 1200, 50, 820, 100, 2, "0.005865000", 1, 1)},
    {"day": "2026-03-02", **totals(5, 1100, 0, 0, 50, 20, 1, "0.010016000", 0, 2)},
]
ALL = totals(10, 4700, 1200, 50, 870, 120, 3, "0.015881000", 1, 3)


def reference(records: Sequence[Record], by: Sequence[str], key_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A naive re-implementation of SPEC §8 over the records, row by row."""
    names = key_names or {}

    def field(r: Record, name: str) -> list[Any]:
        when = dt.datetime.fromtimestamp(r.started_at, UTC)
        if name == "key":
            return [None if r.key_id is None else (names.get(r.key_id) or r.key_name or r.key_id), r.key_hint]
        if name.startswith("tag:"):
            tags = json.loads(r.tags) if r.tags else None
            value = tags.get(name[4:]) if isinstance(tags, dict) else None
            text = value if isinstance(value, str) or value is None else json.dumps(value)
            return [text or None]  # without the tag, or with an empty one: no value
        return [{
            "model": r.model or r.model_requested,
            "tier": r.service_tier,
            "endpoint": r.endpoint,
            "project": r.project,
            "user": r.user_id,
            "session": r.session_id,
            "day": when.strftime("%Y-%m-%d"),
            "hour": when.strftime("%Y-%m-%dT%H:00:00Z"),
        }[name]]

    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        values = [v for name in by for v in field(r, name)]
        g = groups.setdefault(tuple(values), {**dict(zip(output_columns(by), values)), **totals(0, 0, 0, 0, 0, 0, 0, None, 0, 0)})
        g["requests"] += 1
        for col in ("input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "web_search_calls"):
            g[col] += getattr(r, col) or 0
        if r.cost_usd is not None:  # a group with no priced row keeps no cost
            g["cost_usd"] = (g["cost_usd"] or 0) + r.cost_usd
        g["unpriced_requests"] += int(r.has_usage and r.cost_usd is None)
        g["unmetered_requests"] += int(r.error_type == "unmetered")
        g["errors"] += int(r.outcome not in ("completed", "in_progress"))
    rows = list(groups.values())
    rows.sort(key=lambda row: [(row[c] is None, row[c] or "") for c in output_columns(by) if c not in METRIC_COLUMNS])
    return rows


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seed(tmp_path_factory.mktemp("report") / "seeded.duckdb", seeded_records())


# --- groupings -------------------------------------------------------------------------


def test_totals_without_by(ledger: Path) -> None:
    assert report_json("--ledger", str(ledger)) == [ALL]


@pytest.mark.parametrize(("by", "expected"), [("key", BY_KEY), ("model", BY_MODEL), ("tier", BY_TIER), ("day", BY_DAY)])
def test_groupings_match_hand_sums(ledger: Path, by: str, expected: list[dict[str, Any]]) -> None:
    assert report_json("--ledger", str(ledger), "--by", by) == expected


def test_hour_endpoint_project_user_by_hand(ledger: Path) -> None:
    hours = report_json("--ledger", str(ledger), "--by", "hour")
    assert [(h["hour"], h["requests"], h["input_tokens"]) for h in hours] == [
        ("2026-03-01T10:00:00Z", 2, 1500),
        ("2026-03-01T11:00:00Z", 2, 2100),
        ("2026-03-01T23:00:00Z", 1, 0),
        ("2026-03-02T00:00:00Z", 1, 800),
        ("2026-03-02T01:00:00Z", 2, 300),
        ("2026-03-02T02:00:00Z", 2, 0),
    ]
    endpoints = report_json("--ledger", str(ledger), "--by", "endpoint")
    assert [(e["endpoint"], e["requests"], e["cost_usd"], e["errors"]) for e in endpoints] == [
        ("chat.completions", 2, Decimal("0.000615000"), 0),
        ("embeddings", 1, Decimal("0.000016000"), 0),
        ("other", 1, None, 0),
        ("responses", 6, Decimal("0.015250000"), 3),
    ]
    projects = report_json("--ledger", str(ledger), "--by", "project")
    assert [(p["project"], p["requests"], p["output_tokens"]) for p in projects] == [("proj_a", 4, 400), ("proj_b", 3, 450), (None, 3, 20)]
    users = report_json("--ledger", str(ledger), "--by", "user")
    assert [(u["user"], u["requests"], u["input_tokens"], u["cost_usd"]) for u in users] == [
        ("alice", 4, 3300, Decimal("0.014615000")),
        ("bob", 2, 500, Decimal("0.001250000")),
        ("carol", 1, 800, Decimal("0.000016000")),
        (None, 3, 100, None),
    ]


def test_every_grouping_matches_reference(ledger: Path) -> None:
    groupings = [*GROUP_FIELDS, "key,model", "day,key,tier", "model,user,hour", "endpoint,project", ",".join(GROUP_FIELDS),
                 "tag:team", "tag:feature,tag:team", "session,tag:n", "key,tag:team,day"]
    results = reports_json(*(["--ledger", str(ledger), "--by", by] for by in groupings))
    for by, rows in zip(groupings, results):
        assert rows == reference(seeded_records(), by.split(",")), by


def test_combination_by_hand(ledger: Path) -> None:
    rows = report_json("--ledger", str(ledger), "--by", "day,key")
    assert [(r["day"], r["key"], r["requests"], r["cost_usd"], r["errors"]) for r in rows] == [
        ("2026-03-01", ID_B, 2, Decimal("0.000615000"), 0),
        ("2026-03-01", "team-a", 2, Decimal("0.005250000"), 0),
        ("2026-03-01", None, 1, None, 1),
        ("2026-03-02", ID_B, 2, Decimal("0.010000000"), 2),
        ("2026-03-02", "team-a", 3, Decimal("0.000016000"), 0),
    ]
    # --by may be repeated, and a field named twice counts once
    assert report_json("--ledger", str(ledger), "--by", "day", "--by", "key,day") == rows


# --- windows -----------------------------------------------------------------------------


def test_windows(ledger: Path) -> None:
    cases = [
        (["--since", "2026-03-02"], 5),
        (["--until", "2026-03-01"], 5),  # a bare --until date includes that day
        (["--since", "2026-03-01", "--until", "2026-03-01"], 5),
        (["--since", "2026-03-01T11:00:00Z", "--until", "2026-03-02T01:00:00"], 4),  # until is exclusive; no offset = UTC
        (["--since", "2026-03-01T12:00:00+01:00", "--until", "2026-03-01T12:00:00+00:00"], 2),  # 11:00Z .. 12:00Z
        (["--since", "2026-03-01T23:59:59Z", "--until", "2026-03-02T00:10:00Z"], 1),
        (["--since", "2026-04-01"], 0),
        # a bare date in any ISO form includes that day as --until, as 2026-03-01 does
        (["--until", "20260301"], 5),
        (["--since", "20260301", "--until", "20260301"], 5),
        (["--since", "2026-W09-7", "--until", "2026W097"], 5),  # 2026-03-01 as an ISO week date
    ]
    results = reports_json(*(["--ledger", str(ledger), *args] for args, _ in cases))
    for (args, expected), [row] in zip(cases, results):
        assert row["requests"] == expected, args
    [day2] = report_json("--ledger", str(ledger), "--since", "2026-03-02")
    assert day2 == {k: v for k, v in BY_DAY[1].items() if k != "day"}


def test_spans_back_from_now(tmp_path: Path) -> None:
    now = dt.datetime.now(UTC)
    path = seed(
        tmp_path / "recent.duckdb",
        [
            make_record(at=now - dt.timedelta(minutes=10), input_tokens=1, output_tokens=0),
            make_record(at=now - dt.timedelta(hours=2), input_tokens=10, output_tokens=0),
            make_record(at=now - dt.timedelta(hours=30), input_tokens=100, output_tokens=0),
            make_record(at=now - dt.timedelta(days=10), input_tokens=1000, output_tokens=0),
        ],
    )

    cases = [([], 1111), (["--since", "30m"], 1), (["--since", "24h"], 11), (["--since", "7d"], 111), (["--since", "2w"], 1111),
             (["--since", "48h", "--until", "24h"], 100), (["--until", "1h"], 1110)]
    results = reports_json(*(["--ledger", str(path), *args] for args, _ in cases))
    for (args, expected), [row] in zip(cases, results):
        assert row["input_tokens"] == expected, args


def test_parse_when() -> None:
    now = dt.datetime(2026, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_when("7d", now=now) == now - dt.timedelta(days=7)
    assert parse_when("90m", now=now) == dt.datetime(2026, 5, 10, 10, 30, tzinfo=UTC)
    assert parse_when("2026-05-01") == dt.datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_when("2026-05-01", end_of_day=True) == dt.datetime(2026, 5, 2, tzinfo=UTC)
    assert parse_when("2026-05-01T10:00:00+02:00") == dt.datetime(2026, 5, 1, 8, tzinfo=UTC)
    assert parse_when("2026-05-01 10:00") == dt.datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert parse_when("20260501", end_of_day=True) == dt.datetime(2026, 5, 2, tzinfo=UTC)
    assert parse_when("20260501T0000", end_of_day=True) == dt.datetime(2026, 5, 1, tzinfo=UTC)  # a time: not moved


# --- formats -------------------------------------------------------------------------------


def test_json_keys_exact(ledger: Path) -> None:
    assert list(report_json("--ledger", str(ledger))[0]) == list(METRIC_COLUMNS)
    rows = report_json("--ledger", str(ledger), "--by", "key,model,tier,endpoint,project,user,day,hour")
    expected = ["key", "key_hint", "model", "tier", "endpoint", "project", "user", "day", "hour", *METRIC_COLUMNS]
    assert rows and all(list(row) == expected for row in rows)
    result = run_meter("report", "--ledger", str(ledger), "--by", "model", "--format", "json")
    as_floats = json.loads(result.stdout)
    assert isinstance(as_floats[0]["cost_usd"], float) and isinstance(as_floats[0]["requests"], int)  # numbers, so scripts can sum them
    assert '"cost_usd": 0.015250000' in result.stdout  # exactly 9 decimals, written from the decimal
    empty = run_meter("report", "--ledger", str(ledger), "--by", "model", "--since", "2030-01-01", "--format", "json")
    assert json.loads(empty.stdout) == []


def test_csv_header_and_rows(ledger: Path) -> None:
    result = run_meter("report", "--ledger", str(ledger), "--by", "key,model", "--format", "csv")
    assert result.returncode == 0
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames == ["key", "key_hint", "model", *METRIC_COLUMNS]
    rows = list(reader)
    as_json = report_json("--ledger", str(ledger), "--by", "key,model")
    assert len(rows) == len(as_json)  # no total row
    for got, want in zip(rows, as_json):
        for col, value in want.items():
            expected = "" if value is None else (f"{value:.9f}" if isinstance(value, Decimal) else str(value))
            assert got[col] == expected, (col, got, want)
    assert sum(Decimal(r["cost_usd"]) for r in rows if r["cost_usd"]) == ALL["cost_usd"]


def test_table_ends_with_total(ledger: Path) -> None:
    result = run_meter("report", "--ledger", str(ledger), "--by", "key")
    assert result.returncode == 0
    lines = result.stdout.rstrip("\n").splitlines()
    assert lines[0].split() == ["key", "key_hint", *METRIC_COLUMNS]
    assert lines[1].split()[:2] == [ID_B, HINT_B]
    assert lines[2].split()[:2] == ["team-a", HINT_A]
    assert lines[3].split()[:2] == ["-", "-"]  # requests without a key
    assert set(lines[-2].replace(" ", "")) == {"-"}
    total = lines[-1].split()
    assert total == ["total", "10", "4700", "1200", "50", "870", "120", "3", "0.015881", "1", "0", "3"]
    # without --by the one row is the total
    plain = run_meter("report", "--ledger", str(ledger)).stdout.rstrip("\n").splitlines()
    assert plain[0].split() == list(METRIC_COLUMNS)
    assert plain[-1].split() == total
    assert len(plain) == 3


def test_two_ledgers_report_as_one(tmp_path: Path, ledger: Path) -> None:
    records = seeded_records()
    first = seed(tmp_path / "replica-1.duckdb", records[::2])
    second = seed(tmp_path / "replica-2.duckdb", records[1::2])
    for by in ("key", "model,day", "hour,user", "tag:team,session"):
        one = report_json("--ledger", str(ledger), "--by", by)
        assert report_json("--ledger", str(first), "--ledger", str(second), "--by", by) == one
    assert report_json("--ledger", str(first), "--ledger", str(second)) == [ALL]
    assert report_json("--ledger", str(first), "--ledger", str(second), "--since", "2026-03-02") == [{k: v for k, v in BY_DAY[1].items() if k != "day"}]


def test_config_names_keys_at_report_time(tmp_path: Path, ledger: Path) -> None:
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{ID_B}" = "team-b"\n"{ID_A}" = "search"\n')
    rows = report_json("--ledger", str(ledger), "--by", "key", "--config", str(config))
    assert [(r["key"], r["key_hint"], r["requests"]) for r in rows] == [("search", HINT_A, 5), ("team-b", HINT_B, 4), (None, None, 1)]


def test_configured_default_ledger(tmp_path: Path, ledger: Path) -> None:
    config = tmp_path / "meter.toml"
    config.write_text(f'ledger = "{ledger}"\n')
    assert report_json("--config", str(config)) == [ALL]


# --- bad arguments -----------------------------------------------------------------------


def test_bad_arguments_one_line(tmp_path: Path, ledger: Path) -> None:
    lg = ["--ledger", str(ledger)]
    not_a_ledger = tmp_path / "other.duckdb"
    import duckdb

    duckdb.connect(str(not_a_ledger)).close()
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"this is not a database" * 100)
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        ([*lg, "--by", "model,colour"], ("--by", "colour")),
        ([*lg, "--since", "last tuesday"], ("--since", "last tuesday")),
        ([*lg, "--until", "2026-13-45"], ("--until",)),
        ([*lg, "--since", "2026-03-02", "--until", "2026-03-01T00:00Z"], ("--since", "--until")),
        ([*lg, "--format", "xml"], ("--format",)),
        ([*lg, "--url", "http://127.0.0.1:1"], ("--url",)),
        (["--ledger", str(tmp_path / "missing.duckdb")], ("missing.duckdb",)),
        (["--ledger", str(not_a_ledger)], ("requests",)),
        (["--ledger", str(garbage)], ("garbage.duckdb",)),
        (["--url", f"http://127.0.0.1:{free_port()}"], ("--url", "cannot reach")),
        (["--url", "ftp://example"], ("--url",)),
        (["--ledger", "mysql://db/x"], ("ledger",)),
        (["--config", str(tmp_path / "nope.toml")], ("config",)),
        (["--ledger", "postgresql://meter:secretpw@127.0.0.1:1/x"], ("ledger",)),
    ]
    # Each case is its own `meter report` process; they run side by side.
    for (_, words), result in zip(cases, run_meters(*(["report", *args] for args, _ in cases))):
        assert_one_line_error(result, *words)
        assert "secretpw" not in result.stderr


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_admin_token_stays_home(status: int) -> None:
    """urllib follows a redirect to any host and sends the Authorization header again:
    the admin address must not be able to hand METER_ADMIN_TOKEN to another host."""
    with redirect_elsewhere(status) as redirect:
        result = run_meter_env({"METER_ADMIN_TOKEN": "report-SECRET"}, "report", "--url", redirect.url)
    assert_one_line_error(result, "--url", redirect.url, f"HTTP {status}", "does not follow redirects")
    assert redirect.reached == [] and "report-SECRET" not in result.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://[::1", "http://127.0.0.1:99999", "http://exa mple"])
def test_a_malformed_url_is_one_line(url: str) -> None:
    assert_one_line_error(run_meter("report", "--url", url), "--url")


async def test_admin_without_report_api_is_one_line(tmp_path: Path) -> None:
    from aiohttp import web

    from .socket_server import serving

    app = web.Application()
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    async with serving(app) as port:
        assert_one_line_error(await arun_meter("report", "--url", f"http://127.0.0.1:{port}"), "--url", "report API")


def test_report_sql_dialects() -> None:
    since = dt.datetime(2026, 1, 1, tzinfo=UTC)
    duck, params = report_sql("duckdb", ["day", "key"], since, None)
    assert params == [since] and "$1" in duck and "strftime" in duck and "GROUP BY" in duck
    pg, _ = report_sql("postgresql", ["hour"], since, since + dt.timedelta(days=1))
    assert "to_char" in pg and "$2" in pg
    # a tag's name is a parameter on both dialects, never text of the query
    duck, params = report_sql("duckdb", ["tag:team-x"], None, None)
    assert "team-x" not in duck and params == ['$."team-x"'] and "json_extract_string" in duck
    pg, params = report_sql("postgresql", ["tag:team-x"], None, None)
    assert "team-x" not in pg and params == ["team-x"] and "->>" in pg
    with pytest.raises(ValueError):
        report_sql("mysql", [], None, None)


# --- a running meter: --url ---------------------------------------------------------------


async def test_url_report_equals_ledger_report_after_shutdown(upstream, start_meter, tmp_path: Path) -> None:
    import openai

    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{ID_A}" = "team-search"\n')
    meter = await start_meter(upstream.url, config=str(config))
    usages = [
        (KEY_A, "gpt-4o", {"input_tokens": 120, "cached_tokens": 40, "cache_write_tokens": 16, "output_tokens": 30, "reasoning_tokens": 12}),
        (KEY_A, "gpt-4o-mini", {"input_tokens": 1000, "cached_tokens": 0, "output_tokens": 200, "reasoning_tokens": 0}),
        (KEY_B, "gpt-4o", {"input_tokens": 7, "cached_tokens": 0, "output_tokens": 3, "reasoning_tokens": 1}),
        (KEY_B, "gpt-4o", {"input_tokens": 50, "cached_tokens": 10, "output_tokens": 5, "reasoning_tokens": 0}),
    ]
    for key, model, usage in usages:
        client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=key, max_retries=0)
        await client.responses.create(model=model, input="hi", extra_headers={"x-fake-usage": json.dumps(usage)})
        await client.close()
    # a request that fails upstream: an error row
    failing = {"Authorization": f"Bearer {KEY_B}", "x-fake-scenario": "status:500"}
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers=failing) as r:
        assert r.status == 500
    # no flush here: the API flushes the writer's queue itself
    by = "key,model,tier,day"
    live = await arun_meter("report", "--url", meter.admin_url, "--by", by, "--format", "json")
    assert live.returncode == 0, live.stderr
    rows = json.loads(live.stdout, parse_float=Decimal)
    assert sum(r["requests"] for r in rows) == 5
    by_key: dict[str, dict[str, int]] = {}
    for r in rows:
        k = by_key.setdefault(r["key"], {"requests": 0, "input_tokens": 0, "errors": 0})
        for col in k:
            k[col] += r[col]
    assert by_key == {"team-search": {"requests": 2, "input_tokens": 1120, "errors": 0}, ID_B: {"requests": 3, "input_tokens": 57, "errors": 1}}
    assert {r["key_hint"] for r in rows} == {HINT_A, HINT_B}
    # side by side, each its own process; the running meter holds its DuckDB file: --ledger says to use --url
    live_table, live_csv, live_total, locked = await asyncio.gather(
        arun_meter("report", "--url", meter.admin_url, "--by", by),
        arun_meter("report", "--url", meter.admin_url, "--by", by, "--format", "csv"),
        arun_meter("report", "--url", meter.admin_url, "--format", "json"),
        arun_meter("report", "--ledger", str(meter.ledger_path)),
    )
    assert_one_line_error(locked, "--url")
    # the API itself: same JSON, and bad arguments are a 400 with a reason
    async with aiohttp.ClientSession() as s:
        async with s.get(meter.admin_url + "/api/report", params={"by": by}) as r:
            assert r.status == 200 and r.content_type == "application/json"
            assert await r.text() == live.stdout
        async with s.get(meter.admin_url + "/api/report", params={"by": "colour"}) as r:
            assert r.status == 400 and "colour" in (await r.json())["error"]
    await meter.stop()
    after, table, csv, total = await asyncio.gather(  # side by side, each its own process reading the file
        arun_meter("report", "--ledger", str(meter.ledger_path), "--by", by, "--format", "json", "--config", str(config)),
        arun_meter("report", "--ledger", str(meter.ledger_path), "--by", by),
        arun_meter("report", "--ledger", str(meter.ledger_path), "--by", by, "--format", "csv"),
        arun_meter("report", "--ledger", str(meter.ledger_path), "--format", "json"),
    )
    assert after.returncode == 0, after.stderr
    assert after.stdout == live.stdout
    assert table.stdout == live_table.stdout
    assert csv.stdout == live_csv.stdout
    assert total.stdout == live_total.stdout


async def test_url_report_with_window(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers={"x-fake-usage": json.dumps({"input_tokens": 5, "output_tokens": 1})}) as r:
                await r.read()
    now, future, past, soon = await asyncio.gather(  # side by side, each its own process
        arun_meter("report", "--url", meter.admin_url, "--since", "1h", "--format", "json"),
        arun_meter("report", "--url", meter.admin_url, "--since", "2099-01-01", "--by", "model", "--format", "json"),
        arun_meter("report", "--url", meter.admin_url, "--until", "2020-01-01", "--format", "json"),
        arun_meter("report", "--url", meter.admin_url, "--since", "soon"),
    )
    assert json.loads(now.stdout)[0]["requests"] == 3
    assert json.loads(future.stdout) == []
    assert json.loads(past.stdout)[0]["requests"] == 0
    assert_one_line_error(soon, "--since")


# --- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_ledger_reports_like_duckdb(pg_url: str, ledger: Path) -> None:
    from meter.ledger import PostgresStore

    store = PostgresStore(pg_url)
    store.open()
    try:
        store.write(seeded_records())
    finally:
        store.close()
    groupings = ("", "key", "model", "tier", "day", "hour", "endpoint,project,user", "day,key,tier", "session", "tag:team", "tag:n,tag:feature", "session,tag:team,key")
    cases = [["--by", by] if by else [] for by in groupings] + [["--since", "2026-03-01T11:00:00Z", "--until", "2026-03-02T01:00:00"]]
    results = reports_json(*(["--ledger", where, *args] for args in cases for where in (pg_url, str(ledger))))
    for i, args in enumerate(cases):
        assert results[2 * i] == results[2 * i + 1], args
    assert_one_line_error(run_meter("report", "--ledger", pg_url, "--ledger", str(ledger)), "PostgreSQL")


async def test_running_meter_on_postgres_reports_by_url_and_ledger(upstream, start_meter, pg_url: str) -> None:
    meter = await start_meter(upstream.url, ledger=pg_url)
    async with aiohttp.ClientSession() as s:
        for key, n in ((KEY_A, 3), (KEY_B, 2)):
            for _ in range(n):
                headers = {"Authorization": f"Bearer {key}", "x-fake-usage": json.dumps({"input_tokens": 11, "output_tokens": 4}), "Meter-Tag-Team": key[-4:], "Meter-Session": f"run-{n}"}
                async with s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers=headers) as r:
                    assert r.status == 200
                    await r.read()
    live = await arun_meter("report", "--url", meter.admin_url, "--by", "key,model,hour", "--format", "json")
    assert live.returncode == 0, live.stderr
    rows = json.loads(live.stdout)
    assert sorted((r["key"], r["requests"], r["input_tokens"]) for r in rows) == sorted([(ID_A, 3, 33), (ID_B, 2, 22)])
    # PostgreSQL is not held by the proxy: --ledger reads it while it runs, with the same answer
    direct = await arun_meter("report", "--ledger", pg_url, "--by", "key,model,hour", "--format", "json")
    assert direct.stdout == live.stdout
    # tags, sessions, filters and the top group: the same through the API as from the database
    served = rows[0]["model"]  # the model as the upstream named it: what --by model shows, --where model= takes
    wanted = ["--by", "tag:team,session", "--where", f"model={served}", "--where", "tag:team=0001", "--top", "1", "--format", "json"]
    live = await arun_meter("report", "--url", meter.admin_url, *wanted)
    [row] = json.loads(live.stdout)
    assert (row["tag:team"], row["session"], row["requests"]) == ("0001", "run-3", 3)
    assert (await arun_meter("report", "--ledger", pg_url, *wanted)).stdout == live.stdout


async def test_unmetered_calls_are_a_column_of_their_own(upstream, meter_process, tmp_path: Path) -> None:
    # A Chat Completions stream without `stream_options.include_usage` (the SDK's
    # default) completes with no usage: the report says so instead of showing a
    # clean "nothing unpriced, no errors" (SPEC §2b, §8).
    import aiohttp

    from .conftest import SECRET_KEY

    path = tmp_path / "unmetered.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(path))
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        for body in (chat, {**chat, "stream_options": {"include_usage": True}}):
            async with s.post(meter.url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200
                await r.read()
    meter.stop()
    rows = ledger_rows(path)
    assert sorted(((r["outcome"], r["error_type"], r["error_code"]) for r in rows), key=str) == [
        ("completed", "unmetered", "no_include_usage"),
        ("completed", None, None),
    ]
    [row] = report_json("--ledger", str(path))
    assert (row["requests"], row["unmetered_requests"], row["unpriced_requests"], row["errors"]) == (2, 1, 0, 0)
