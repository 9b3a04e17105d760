"""`meter report --by tag:NAME|session`, `--where`, `--top`, report-time key names and
unknown costs (SPEC §8, §10), on real DuckDB files, a real PostgreSQL ledger and a
real running `meter serve`.

Every filtered report is checked against a naive filter over the seeded records
(`matches`) fed to test_report's naive aggregation (`reference`), and the few
cases that matter most against numbers summed by hand.  The same reports on
PostgreSQL must equal DuckDB's, row for row.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meter.ledger import PostgresStore, open_reader
from meter.record import Record
from meter.report import parse_args, report

from .test_report import (
    D1,
    D2,
    HINT_A,
    HINT_B,
    ID_A,
    ID_B,
    KEY_A,
    KEY_B,
    arun_meter,
    assert_one_line_error,
    make_record,
    reference,
    report_json,
    run_meter,
    run_meters,
    seed,
    seeded_records,
    totals,
    write_all,
)

UTC = dt.UTC


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seed(tmp_path_factory.mktemp("filters") / "seeded.duckdb", seeded_records())


def run_report(ledgers: Sequence[str], by: str = "", where: Sequence[str] = (), top: str | None = None, key_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The report the CLI makes, in this process: the same argument reader and query over
    a real store (hundreds of cases would otherwise be hundreds of processes)."""
    store = open_reader(list(ledgers))
    try:
        return report(store, parse_args(by or None, None, None, list(where), top), key_names)
    finally:
        store.close()


def tag(r: Record, name: str) -> str | None:
    tags = json.loads(r.tags) if r.tags else None
    value = tags.get(name) if isinstance(tags, dict) else None
    text = value if isinstance(value, str) or value is None else json.dumps(value)
    return text or None


def matches(r: Record, condition: str, key_names: dict[str, str]) -> bool:
    """A naive reading of one `--where FIELD=VALUE` for one record."""
    name, _, value = condition.partition("=")
    want = value or None
    when = dt.datetime.fromtimestamp(r.started_at, UTC)
    if name == "key":
        if want is None:
            return r.key_id is None
        return r.key_id == want or key_names.get(r.key_id or "") == want or (r.key_id not in key_names and r.key_name == want)
    if name.startswith("tag:"):
        return tag(r, name[4:].lower()) == want
    got = {
        "model": r.model or r.model_requested,
        "tier": r.service_tier,
        "endpoint": r.endpoint,
        "project": r.project,
        "user": r.user_id,
        "session": r.session_id,
        "day": when.strftime("%Y-%m-%d"),
        "hour": when.strftime("%Y-%m-%dT%H:00:00Z"),
    }[name]
    return got == want


# (where..., by): every field alone, empty values, ANDed pairs, keys by name and id.
WHERE_CASES: list[tuple[list[str], str]] = [
    (["key=team-a"], "model"),
    ([f"key={ID_B}"], "day"),
    (["key="], "model"),
    (["model=gpt-4o"], "key"),
    (["tier=default"], "user"),
    (["tier="], "endpoint"),
    (["endpoint=chat.completions"], "tier"),
    (["project=proj_a"], "session"),
    (["user=alice"], "tag:team"),
    (["session=s2"], "key,model"),
    (["session="], "hour"),
    (["tag:team=ads"], "session"),
    (["tag:team="], "key"),
    (["tag:feature=autocomplete"], "tag:team"),
    (["tag:n=5"], ""),
    (["day=2026-03-02"], "hour"),
    (["hour=2026-03-01T10:00:00Z"], "user"),
    (["key=team-a", "tag:team=search"], "model"),
    (["model=gpt-4o", "day=2026-03-02"], "key"),
    (["session=s1", "user=alice", "tier=default"], "tag:feature"),
    (["user=nobody"], "model"),
    (["key=team-a", f"key={ID_B}"], ""),  # ANDed: no row is both
]


def expected(where: Sequence[str], by: str, key_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    names = key_names or {}
    rows = [r for r in seeded_records() if all(matches(r, cond, names) for cond in where)]
    fields = by.split(",") if by else []
    if not fields and not rows:
        return [totals(0, 0, 0, 0, 0, 0, 0, None, 0, 0)]  # no --by: always the one total row
    return reference(rows, fields, names)


def test_where_matches_reference_on_every_field(ledger: Path) -> None:
    for where, by in WHERE_CASES:
        assert run_report([str(ledger)], by, where) == expected(where, by), (where, by)


def test_where_by_hand(ledger: Path) -> None:
    # team-a's rows tagged team=search: the first two of day 1
    [row] = report_json("--ledger", str(ledger), "--where", "key=team-a", "--where", "tag:team=search")
    assert (row["requests"], row["input_tokens"], row["cost_usd"]) == (2, 1500, Decimal("0.005250000"))
    # a whole day, and an hour named by any time inside it
    [day] = report_json("--ledger", str(ledger), "--where", "day=2026-03-02")
    assert (day["requests"], day["cost_usd"]) == (5, Decimal("0.010016000"))
    assert report_json("--ledger", str(ledger), "--where", "hour=2026-03-01T11:59:59+00:00") == report_json(
        "--ledger", str(ledger), "--where", "hour=2026-03-01T11:00:00Z"
    )
    [hour] = report_json("--ledger", str(ledger), "--where", "hour=2026-03-01T12:30:00+01:00")
    assert hour["requests"] == 2  # 11:00Z..12:00Z
    # a field's empty value: the rows without it
    [keyless] = report_json("--ledger", str(ledger), "--where", "key=")
    assert (keyless["requests"], keyless["errors"], keyless["cost_usd"]) == (1, 1, None)


def test_by_tag_by_hand(ledger: Path) -> None:
    rows = report_json("--ledger", str(ledger), "--by", "tag:TEAM")  # read lower-case, as tags are stored
    assert list(rows[0]) == ["tag:team", *list(totals(0, 0, 0, 0, 0, 0, 0, None, 0, 0))]
    assert [(r["tag:team"], r["requests"], r["input_tokens"], r["cost_usd"]) for r in rows] == [
        ("ads", 2, 2300, Decimal("0.010615000")),
        ("search", 2, 1500, Decimal("0.005250000")),
        # no such tag, an empty one, tags that are not an object, "Team" in another case
        (None, 6, 900, Decimal("0.000016000")),
    ]
    numbers = report_json("--ledger", str(ledger), "--by", "tag:n")
    assert [(r["tag:n"], r["requests"]) for r in numbers] == [("5", 1), (None, 9)]
    sessions = report_json("--ledger", str(ledger), "--by", "session")
    assert [(r["session"], r["requests"], r["cost_usd"]) for r in sessions] == [
        ("s1", 3, Decimal("0.005250000")),
        ("s2", 3, Decimal("0.010615000")),
        ("s3", 1, Decimal("0.000016000")),
        (None, 3, None),  # no row of these has a price
    ]


def test_unknown_cost_is_empty_in_every_format(ledger: Path) -> None:
    args = ["--ledger", str(ledger), "--by", "session"]
    as_json = run_meter("report", *args, "--format", "json")
    assert '"session": null' in as_json.stdout and '"cost_usd": null' in as_json.stdout
    csv_lines = run_meter("report", *args, "--format", "csv").stdout.splitlines()
    assert csv_lines[-1].split(",")[0] == "" and csv_lines[-1].split(",")[8] == ""  # empty session, empty cost
    assert csv_lines[1].split(",")[8] == "0.005250000"
    table = run_meter("report", *args).stdout.splitlines()
    header = table[0]
    cost_end = header.index("cost_usd") + len("cost_usd")
    no_session = table[4]
    assert no_session.startswith("-") and no_session[:cost_end].rstrip().endswith(" 0")  # web_search_calls, then a blank cost
    assert table[-1][:cost_end].endswith("0.015881")  # the total sums the priced groups
    # a group where some rows are priced sums those: BY_TIER's priority row is unpriced alone
    tiers = {r["tier"]: r for r in report_json("--ledger", str(ledger), "--by", "tier")}
    assert tiers["priority"]["cost_usd"] is None and tiers[None]["cost_usd"] == Decimal("0.000016000")
    # nothing at all matches: the one total row has no cost
    [nothing] = report_json("--ledger", str(ledger), "--where", "user=nobody")
    assert (nothing["requests"], nothing["cost_usd"]) == (0, None)
    plain = run_meter("report", "--ledger", str(ledger), "--where", "user=nobody").stdout.splitlines()
    assert plain[-1].split() == ["total", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"]  # cost blank: 10 numbers, not 11


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Highest cost first (no cost last), then most requests; ties keep the group order."""
    return sorted(rows, key=lambda r: (r["cost_usd"] is None, -(r["cost_usd"] or 0), -r["requests"]))


def test_top(ledger: Path) -> None:
    rows = report_json("--ledger", str(ledger), "--by", "key,model", "--top", "3")
    assert [(r["key"], r["model"], r["cost_usd"]) for r in rows] == [
        (ID_B, "gpt-4o", Decimal("0.010000000")),
        ("team-a", "gpt-4o", Decimal("0.005250000")),
        (ID_B, "gpt-4o-mini", Decimal("0.000615000")),
    ]
    for by, top in (("user", "2"), ("session", "4"), ("hour", "3"), ("tag:team,day", "100"), ("endpoint", "1"), ("", "1")):
        full = reference(seeded_records(), by.split(",") if by else [])
        assert run_report([str(ledger)], by, top=top) == ranked(full)[: int(top)], (by, top)
    # groups without a cost rank last, the one with more requests first
    hours = report_json("--ledger", str(ledger), "--by", "hour", "--top", "6")
    assert [(r["hour"], r["requests"], r["cost_usd"]) for r in hours[-2:]] == [("2026-03-02T02:00:00Z", 2, None), ("2026-03-01T23:00:00Z", 1, None)]
    # with --where, and the table's total is the total of the rows shown
    table = run_meter("report", "--ledger", str(ledger), "--by", "model", "--where", "day=2026-03-01", "--top", "1").stdout.splitlines()
    assert table[1].split()[:2] == ["gpt-4o", "3"] and table[-1].split()[:2] == ["total", "3"]  # not the 2 gpt-4o-mini rows


def test_filters_on_postgres_equal_duckdb(pg_url: str, ledger: Path) -> None:
    write_all(PostgresStore(pg_url), seeded_records())
    for where, by in WHERE_CASES:
        assert run_report([pg_url], by, where) == run_report([str(ledger)], by, where), (where, by)
    for by, top in (("key,model", "3"), ("session", "2"), ("tag:team", "1"), ("tag:feature,user", "4")):
        assert run_report([pg_url], by, top=top) == run_report([str(ledger)], by, top=top), (by, top)
    names = {ID_A: "search", ID_B: "ads"}
    for where in (["key=search"], ["key=ads", "tag:team=ads"], ["key=team-a"]):
        assert run_report([pg_url], "key,tag:team", where, key_names=names) == run_report([str(ledger)], "key,tag:team", where, key_names=names), where
    # and through the CLI, with the formats
    args = ["--by", "tag:team,session", "--where", "tag:feature=autocomplete", "--top", "2"]
    for fmt in ("json", "csv", "table"):
        assert run_meter("report", "--ledger", pg_url, *args, "--format", fmt).stdout == run_meter("report", "--ledger", str(ledger), *args, "--format", fmt).stdout
    assert report_json("--ledger", pg_url, "--where", "project=x' OR '1'='1") == [totals(0, 0, 0, 0, 0, 0, 0, None, 0, 0)]


def test_bad_filters_are_one_line(ledger: Path) -> None:
    lg = ["--ledger", str(ledger)]
    cases = [
        (["--where", "model"], "--where", "FIELD=VALUE"),
        (["--where", "=gpt-4o"], "--where", "FIELD=VALUE"),
        (["--where", "colour=red"], "--where", "colour"),
        (["--where", "tag:=x"], "--where", "tag name"),
        (["--where", "tag:a.b=x"], "--where", "a.b"),
        (["--where", "tag:" + "x" * 65 + "=1"], "--where", "tag name"),
        (["--where", "day=yesterday"], "--where", "day"),
        (["--where", "day=2026-02-30"], "--where", "day"),
        (["--where", "day="], "--where", "day"),
        (["--where", "hour=2026-03-01"], "--where", "hour"),
        (["--where", "hour=noon"], "--where", "hour"),
        (["--by", "tag:a'b"], "--by", "tag name"),
        (["--by", "tag:"], "--by", "tag name"),
        (["--by", "session,colour"], "--by", "colour"),
        (["--top", "0"], "--top"),
        (["--top", "-1"], "--top"),
        (["--top", "two"], "--top"),
        (["--top", "1.5"], "--top"),
    ]
    for (_, *words), result in zip(cases, run_meters(*(["report", *lg, *args] for args, *_ in cases))):  # side by side: each its own process
        assert_one_line_error(result, *words)
    # values are parameters, never SQL: a quote is just a value that no row has
    [row] = report_json(*lg, "--where", "project=x' OR '1'='1")
    assert row["requests"] == 0
    [row] = report_json(*lg, "--where", "tag:team=ads'--")
    assert row["requests"] == 0


def test_key_named_after_its_first_requests_is_one_group(tmp_path: Path) -> None:
    # key A's first rows were written before any config named it; later ones under
    # "zeta", the newest under "alpha" (the greatest stored name is not the newest).
    a = {"key_id": ID_A, "key_hint": HINT_A}
    path = seed(
        tmp_path / "renamed.duckdb",
        [
            make_record(at=D1, **a, input_tokens=1, output_tokens=0, cost_usd=Decimal("0.1")),
            make_record(at=D1 + dt.timedelta(hours=1), **a, input_tokens=2, output_tokens=0, cost_usd=Decimal("0.2")),
            make_record(at=D1 + dt.timedelta(hours=2), **a, key_name="zeta", input_tokens=4, output_tokens=0, cost_usd=Decimal("0.4")),
            make_record(at=D2, **a, key_name="alpha", input_tokens=8, output_tokens=0),
            make_record(at=D2, key_id=ID_B, key_hint=HINT_B, input_tokens=16, output_tokens=0),
        ],
    )
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{ID_A}" = "team-search"\n')
    named = report_json("--ledger", str(path), "--config", str(config), "--by", "key")
    assert [(r["key"], r["key_hint"], r["requests"], r["input_tokens"], r["cost_usd"]) for r in named] == [
        (ID_B, HINT_B, 1, 16, None),
        ("team-search", HINT_A, 4, 15, Decimal("0.700000000")),
    ]
    # --where takes the config's name, or the key_id; a stored name the config overrides is no longer the key's
    assert report_json("--ledger", str(path), "--config", str(config), "--where", "key=team-search")[0]["requests"] == 4
    assert report_json("--ledger", str(path), "--config", str(config), "--where", f"key={ID_A}")[0]["requests"] == 4
    assert report_json("--ledger", str(path), "--config", str(config), "--where", "key=alpha")[0]["requests"] == 0
    # without a config naming it: still one group, under the newest stored name
    bare = report_json("--ledger", str(path), "--by", "key")
    assert [(r["key"], r["requests"]) for r in bare] == [(ID_B, 1), ("alpha", 4)]


def test_where_key_finds_a_key_renamed_without_a_config_as_by_key_names_it(tmp_path: Path, pg_url: str) -> None:
    # Key A was used before any config named it, then named "search", then renamed
    # "team-search"; the report runs without a config.  `--by key` shows one group
    # "team-search" of all three rows, so `--where key=team-search` is those three rows,
    # and "search" is no longer the key's name.  Within a window that ends before the
    # rename, the newest name in the window is "search", for both.
    a = {"key_id": ID_A, "key_hint": HINT_A}
    records = [
        make_record(at=D1, **a, input_tokens=1, output_tokens=0, cost_usd=Decimal("0.1")),
        make_record(at=D1 + dt.timedelta(hours=1), **a, key_name="search", input_tokens=2, output_tokens=0, cost_usd=Decimal("0.2")),
        make_record(at=D2, **a, key_name="team-search", input_tokens=4, output_tokens=0, cost_usd=Decimal("0.4")),
        make_record(at=D2, key_id=ID_B, key_hint=HINT_B, key_name="ads", input_tokens=16, output_tokens=0),
    ]
    path = seed(tmp_path / "renamed.duckdb", records)
    write_all(PostgresStore(pg_url), records)
    before_rename = (D1 + dt.timedelta(hours=2)).isoformat()
    for ledger in (str(path), pg_url):
        [team] = [r for r in report_json("--ledger", ledger, "--by", "key") if r["key"] == "team-search"]
        assert (team["requests"], team["input_tokens"], team["cost_usd"]) == (3, 7, Decimal("0.700000000"))
        [row] = report_json("--ledger", ledger, "--where", "key=team-search")
        assert (row["requests"], row["input_tokens"], row["cost_usd"]) == (3, 7, Decimal("0.700000000")), ledger
        assert report_json("--ledger", ledger, "--where", "key=search")[0]["requests"] == 0, ledger
        assert report_json("--ledger", ledger, "--where", "key=search", "--by", "key") == [], ledger
        # in a window before the rename the key's newest name is "search"
        [early] = report_json("--ledger", ledger, "--by", "key", "--until", before_rename, "--where", "key=search")
        assert (early["key"], early["requests"], early["input_tokens"]) == ("search", 2, 3), ledger
        assert report_json("--ledger", ledger, "--until", before_rename, "--where", "key=team-search")[0]["requests"] == 0, ledger
        # other filters narrow the rows the name is read from, as they do for --by key
        assert report_json("--ledger", ledger, "--where", "key=ads", "--where", "day=2026-03-02")[0]["requests"] == 1, ledger


# --- a running meter: --url and /api/report ------------------------------------------------


async def send(url: str, key: str, model: str, usage: dict[str, int], headers: dict[str, str] | None = None, metadata: dict[str, str] | None = None) -> None:
    body: dict[str, Any] = {"model": model, "input": "hi"}
    if metadata:
        body["metadata"] = metadata
    h = {"Authorization": f"Bearer {key}", "x-fake-usage": json.dumps(usage), **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/responses", json=body, headers=h) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def test_running_meter_reports_tags_sessions_and_names_keys_from_its_config(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "live.duckdb"
    usage = {"input_tokens": 100, "output_tokens": 10}
    # first run: no config names key A
    first = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    await send(first.url, KEY_A, "gpt-4o", usage, {"Meter-Tag-Team": "search", "Meter-Session": "run-1"})
    await send(first.url, KEY_A, "gpt-4o", usage, {"Meter-Session": "run-1"}, metadata={"team": "search", "feature": "autocomplete"})
    first.stop()
    # second run: the config names it now
    config = tmp_path / "meter.toml"
    config.write_text(f'[keys]\n"{ID_A}" = "team-search"\n')
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--config", str(config))
    await send(proc.url, KEY_A, "gpt-4o", usage, {"Meter-Tag-Feature": "autocomplete", "Meter-Session": "run-2"}, metadata={"team": "search"})
    await send(proc.url, KEY_A, "no-such-model-x", usage, {"Meter-Tag-Team": "search", "Meter-Session": "run-2"})  # no price
    await send(proc.url, KEY_B, "gpt-4o", usage, {"Meter-Tag-Team": "ads", "Meter-Session": "run-3"})

    async def url_json(*args: str) -> list[dict[str, Any]]:
        result = await arun_meter("report", "--url", proc.admin_url, "--format", "json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout, parse_float=Decimal)

    by_key = await url_json("--by", "key")
    assert [(r["key"], r["key_hint"], r["requests"]) for r in by_key] == [(ID_B, HINT_B, 1), ("team-search", HINT_A, 4)]
    by_team = await url_json("--by", "tag:team")
    assert [(r["tag:team"], r["requests"]) for r in by_team] == [("ads", 1), ("search", 4)]
    sessions = await url_json("--by", "session", "--where", "key=team-search")
    assert [(r["session"], r["requests"]) for r in sessions] == [("run-1", 2), ("run-2", 2)]
    # the unpriced model is a group with no cost; run-2 has one priced row and sums it
    models = {r["model"]: r for r in await url_json("--by", "model", "--where", "session=run-2")}
    unknown = next(r for name, r in models.items() if name.startswith("no-such-model"))
    assert unknown["cost_usd"] is None and unknown["unpriced_requests"] == 1
    [run2] = await url_json("--where", "session=run-2")
    priced = next(r for name, r in models.items() if name.startswith("gpt-4o"))
    assert run2["cost_usd"] == priced["cost_usd"] and priced["cost_usd"] > 0
    top = await url_json("--by", "session", "--top", "1")
    assert [r["session"] for r in top] == ["run-1"]  # two priced gpt-4o calls
    features = await url_json("--by", "tag:feature", "--where", "tag:team=search", "--where", "key=team-search")
    assert [(r["tag:feature"], r["requests"]) for r in features] == [("autocomplete", 2), (None, 2)]

    # the API itself: the same JSON for the same parameters; bad ones are a 400 naming them
    wanted = ["--by", "key,tag:team,session", "--where", "tag:team=search", "--top", "2"]
    live = await arun_meter("report", "--url", proc.admin_url, "--format", "json", *wanted)
    params = [("by", "key,tag:team,session"), ("where", "tag:team=search"), ("top", "2")]
    async with aiohttp.ClientSession() as s:
        async with s.get(proc.admin_url + "/api/report", params=params) as r:
            assert r.status == 200 and await r.text() == live.stdout
        for bad, word in ((("where", "colour=1"), "colour"), (("where", "model"), "FIELD=VALUE"), (("top", "0"), "--top"), (("by", "tag:a b"), "tag name"), (("where", "day=x"), "day")):
            async with s.get(proc.admin_url + "/api/report", params=[bad]) as r:
                assert r.status == 400 and word in (await r.json())["error"], bad
    assert_one_line_error(await arun_meter("report", "--url", proc.admin_url, "--where", "tag:=1"), "--where")
    live_table = await arun_meter("report", "--url", proc.admin_url, *wanted)
    proc.stop()
    # stopped: the same report from the file, with the config that names the key
    after = await arun_meter("report", "--ledger", str(ledger), "--config", str(config), "--format", "json", *wanted)
    assert after.stdout == live.stdout
    assert (await arun_meter("report", "--ledger", str(ledger), "--config", str(config), *wanted)).stdout == live_table.stdout


def test_where_values_with_odd_text(tmp_path: Path) -> None:
    # values are taken as given: '=' inside, spaces, quotes, non-ASCII
    path = seed(
        tmp_path / "odd.duckdb",
        [
            make_record(id=str(uuid.uuid4()), project="a=b", user_id="o'brien", tags=json.dumps({"team": "搜索 team"}), input_tokens=1, output_tokens=0),
            make_record(id=str(uuid.uuid4()), project="a", user_id="x", tags=json.dumps({"team": "x"}), input_tokens=2, output_tokens=0),
        ],
    )
    for where, inp in ((["project=a=b"], 1), (["user=o'brien"], 1), (["tag:team=搜索 team"], 1), (["project=a"], 2)):
        [row] = report_json("--ledger", str(path), *(arg for cond in where for arg in ("--where", cond)))
        assert row["input_tokens"] == inp, where


def test_a_filter_value_with_a_character_the_ledger_cannot_hold_matches_as_stored(tmp_path: Path, pg_url: str) -> None:
    # The ledger stores a NUL (or a lone surrogate) as U+FFFD; a filter naming the value
    # as the client sent it finds that row, on both stores.  PostgreSQL refused the NUL
    # as a parameter: the report (and the console, through /api/report) answered 503.
    records = [
        make_record(id=str(uuid.uuid4()), model="m\x00x", user_id="u\ud800", tags=json.dumps({"team": "t\x00"}), input_tokens=3, output_tokens=0),
        make_record(id=str(uuid.uuid4()), model="other", input_tokens=5, output_tokens=0),
    ]
    from meter.ledger.sanitise import sanitise_counting

    sanitise_counting(records)  # as the ledger writer stores them
    duck = seed(tmp_path / "odd.duckdb", records)
    write_all(PostgresStore(pg_url), records)
    for where in (["model=m\x00x"], ["user=u\ud800"], ["tag:team=t\x00"], ["model=m\ufffdx"]):
        for ledger in (pg_url, str(duck)):
            [row] = run_report([ledger], "", where)
            assert row["input_tokens"] == 3, (where, ledger)


def old_ledger_sql(dialect: str) -> str:
    """The requests table as a meter before sessions made it (no session_id column)."""
    from meter.ledger.migrations import _requests_table

    sql = _requests_table(dialect)
    column = ",\n  session_id " + ("VARCHAR" if dialect == "duckdb" else "text")
    assert column in sql
    return sql.replace(column, "")


def test_a_ledger_from_before_sessions_reports_no_sessions(tmp_path: Path, ledger: Path, pg_url: str) -> None:
    import asyncio

    import asyncpg
    import duckdb

    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    con.execute(old_ledger_sql("duckdb"))
    con.execute("INSERT INTO requests (id, started_at, endpoint, input_tokens, output_tokens, cost_usd) VALUES (uuid(), TIMESTAMPTZ '2026-03-01 10:00:00+00', 'responses', 7, 1, 0.5)")
    con.close()
    [row] = report_json("--ledger", str(old), "--by", "session")
    assert (row["session"], row["requests"], row["cost_usd"]) == (None, 1, Decimal("0.500000000"))
    assert report_json("--ledger", str(old), "--where", "session=")[0]["requests"] == 1
    assert report_json("--ledger", str(old), "--where", "session=s1")[0]["requests"] == 0
    # read with a newer file as one: the old file's rows have no session, the new one's keep theirs
    both = report_json("--ledger", str(old), "--ledger", str(ledger), "--by", "session")
    assert [(r["session"], r["requests"]) for r in both] == [("s1", 3), ("s2", 3), ("s3", 1), (None, 4)]

    async def make_old_pg() -> None:
        pg = await asyncpg.connect(pg_url)
        try:
            await pg.execute(old_ledger_sql("postgresql"))
            await pg.execute("INSERT INTO requests (id, started_at, endpoint, input_tokens, output_tokens, cost_usd) VALUES (gen_random_uuid(), '2026-03-01 10:00:00+00', 'responses', 7, 1, 0.5)")
        finally:
            await pg.close()

    asyncio.run(make_old_pg())
    assert report_json("--ledger", pg_url, "--by", "session") == [row]
    assert report_json("--ledger", pg_url, "--where", "session=s1")[0]["requests"] == 0
