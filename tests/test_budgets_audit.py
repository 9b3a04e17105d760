"""Budgets (SPEC §11): a request several budgets refuse, and the three ways of matching
(before forwarding, on the finished record, in the ledger's SQL) agreeing on edge values.

A real meter (in-process, as tests/conftest.py starts it) against the fake
provider and the official SDK; DuckDB ledgers on disk and a real PostgreSQL
server (tests/pg.py) for the spend query.
"""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from meter.budgets.matching import matcher_for
from meter.budgets.spend import Budgets
from meter.budgets.sync import read_spend
from meter.budgets.windows import window_bounds
from meter.config import Budget
from meter.ledger import DuckDBStore
from meter.ledger.schema import random_uuids

from .test_budgets import USAGE, record, sdk, write_config


async def test_a_request_refused_by_several_budgets_is_told_the_latest_reset(upstream, start_meter, tmp_path: Path) -> None:
    # A day budget and a month budget both exceeded: when the day resets, the month
    # still refuses, so Retry-After must wait for the month's reset, and name it.
    config = write_config(
        tmp_path / "meter.toml",
        '[[budgets]]\nname = "daily"\nwindow = "day"\nlimit_usd = 0.000001\nmode = "enforce"\n'
        '[[budgets]]\nname = "monthly"\nwindow = "month"\nlimit_usd = 0.000001\nmode = "enforce"\n',
    )
    meter = await start_meter(upstream.url, config=config)
    client = sdk(meter.url)
    await client.responses.create(model="gpt-4o", input="a", extra_headers=USAGE)
    assert len(meter.meter.budgets.blocked) == 2
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="gpt-4o", input="b")
    headers = refused.value.response.headers
    month_end = window_bounds("month", time.time())[1]
    left = (month_end - dt.datetime.now(dt.UTC)).total_seconds()
    if window_bounds("day", time.time())[1] == month_end:  # the last day of a month: both end together
        assert headers["Meter-Budget"] == "daily"
    else:
        assert headers["Meter-Budget"] == "monthly"
    assert left - 5 <= int(headers["Retry-After"]) <= left + 1
    assert "monthly" in refused.value.message or headers["Meter-Budget"] == "daily"
    states = {s.name: s.rejections for s in meter.meter.budgets.states}
    assert sum(states.values()) == 1 and states[headers["Meter-Budget"]] == 1


def test_a_model_asked_as_empty_text_is_matched_alike_in_memory_and_in_the_ledger(tmp_path: Path) -> None:
    # `"model": ""` is a model asked (the empty one), as the request check and the ledger's
    # coalesce() read it; counting it as the model that served it made this replica's
    # spend differ from the ledger's (and from every other replica's) for good.
    t = time.time()
    budget = Budget(name="m", window="month", limit_usd=Decimal(1), match={"model": "gpt-4o"})
    rows = [
        record(0, "0.25", t, model_requested="", model="gpt-4o"),
        record(1, "0.5", t, model_requested=None, model="gpt-4o"),  # a retrieve: the model that served it
        record(2, "0.125", t, model_requested="gpt-4o", model="gpt-4o-2024-08-06"),
    ]
    in_memory = Budgets([budget], {}, now=t)
    for r in rows:
        r.id = random_uuids(1)[0]  # unmarked: counted by the ledger read only
    store = DuckDBStore(str(tmp_path / "m.duckdb"))
    store.open()
    try:
        store.write(rows)
        [in_ledger] = read_spend(store, [matcher_for(budget, {})], [window_bounds("month", t)], None)
    finally:
        store.close()
    for r in rows:
        r.id = None
        in_memory.add(r)
    assert in_ledger == in_memory.states[0].spend == Decimal("0.625")


def test_the_ledger_sums_of_every_match_agree_on_postgresql_and_duckdb(pg_url: str, tmp_path: Path) -> None:
    # The spend query is one text for both ledgers; every match field, a tag named with a
    # dash and digits, non-ASCII values and absent values sum the same rows on each.
    from meter.identity import key_id
    from meter.ledger import PostgresStore

    from .conftest import SECRET_KEY
    from .test_budgets import MATCHES

    kid = key_id(SECRET_KEY)
    t = time.time()
    shapes: list[dict[str, str | None]] = [
        {"key_id": kid, "model_requested": "gpt-4o", "model": "gpt-4o-2024-08-06", "tags": '{"team": "search", "cost-centre-7": "café"}'},
        {"key_id": "0123456789abcdef", "project": "proj_a", "user_id": "u1", "model": "gpt-4o"},
        {"key_id": kid, "model_requested": "", "model": "gpt-4o", "tags": '{"team": "Search"}'},
        {"project": "proj_a", "user_id": "u2", "tags": '{"team": "search"}'},
        {"key_id": kid, "model_requested": "gpt-4o", "user_id": "ü", "tags": "{}"},
    ]
    matches = [*MATCHES, {"tag:cost-centre-7": "café"}, {"user": "ü"}, {"tag:absent": ""}]
    budgets = [Budget(name=f"b{i}", window="month", limit_usd=Decimal(1), match=m) for i, m in enumerate(matches)]
    matchers = [matcher_for(b, {kid: "team-search"}) for b in budgets]
    windows = [window_bounds("month", t)] * len(budgets)
    sums = []
    for store in (DuckDBStore(str(tmp_path / "m.duckdb")), PostgresStore(pg_url)):
        rows = [record(i, f"0.{i + 1}", t, **shape) for i, shape in enumerate(shapes)]
        for r, id_ in zip(rows, random_uuids(len(rows)), strict=True):
            r.id = id_
        store.open()
        try:
            store.write(rows)
            sums.append(read_spend(store, matchers, windows, None))
        finally:
            store.close()
    in_memory = [sum((r.cost_usd or 0 for r in rows if m.matches_record(r)), Decimal(0)) for m in matchers]
    assert sums[0] == sums[1] == in_memory
    assert in_memory[-3:] == [Decimal("0.1"), Decimal("0.5"), Decimal(0)]


def test_the_budgets_table_aligns_wide_characters_by_the_columns_a_terminal_gives_them() -> None:
    """A budget named in CJK takes two terminal columns per character: every later
    column still starts at the same column on every line (as `meter report`'s table)."""
    from meter.budgets.command import render_budgets
    from meter.report.render import display_width

    row = {"window": "month", "window_start": "2026-12-01T00:00:00+00:00", "window_end": "2027-01-01T00:00:00+00:00", "mode": "enforce",
           "spend_usd": Decimal("1.5"), "limit_usd": Decimal(500), "remaining_usd": Decimal("498.5"), "share": 0.003, "state": "ok"}
    text = render_budgets([{"budget": "研究チーム", **row}, {"budget": "ops", **row}], "table")
    lines = text.splitlines()
    starts = set()
    for line in lines:
        cut = line.index("month") if "month" in line else line.index("window")
        starts.add(display_width(line[:cut]))
    assert len(starts) == 1, text
