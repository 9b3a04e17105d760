"""Budgets (SPEC §11): the config's `[[budgets]]`, spend per window, and enforcement.

The official SDK through a real meter against the fake provider, DuckDB ledgers
on disk, and the `meter budgets` command.  Across replicas on PostgreSQL:
tests/test_budgets_fleet.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from meter.budgets.gate import ERROR_CODE, ERROR_TYPE
from meter.budgets.matching import matcher_for
from meter.budgets.spend import Budgets
from meter.budgets.sync import read_spend
from meter.budgets.windows import seconds_to_reset, window_bounds
from meter.cli import main
from meter.config import Budget
from meter.identity import key_id
from meter.ledger import DuckDBStore
from meter.record import Record

from .conftest import SECRET_KEY, clear_upstream_requests, upstream_requests
from .redirecting import redirect_elsewhere, run_meter_env

OTHER_KEY = "sk-other-0123456789abcdefOTHER"
USAGE = {"x-fake-usage": json.dumps({"input_tokens": 1000, "output_tokens": 500})}


def write_config(path: Path, budgets: str, keys: dict[str, str] | None = None) -> str:
    text = budgets
    if keys:
        text += "\n[keys]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in keys.items())
    path.write_text(text)
    return str(path)


def sdk(base_url: str, key: str = SECRET_KEY) -> openai.AsyncOpenAI:
    # max_retries=0: the SDK retries a 429 by itself, which would hide the first refusal.
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)


# --- the config -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('name = "b1"\nmatch = { team = "x" }\nwindow = "day"\nlimit_usd = 1', "[[budgets]] 'b1': match: unknown match field 'team'"),
        ('name = "b2"\nwindow = "day"\nlimit_usd = -1', "[[budgets]] 'b2': limit_usd: Input should be greater than 0"),
        ('name = "b3"\nwindow = "year"\nlimit_usd = 1', "[[budgets]] 'b3': window:"),
        ('name = "b4"\nwindow = "day"\nlimit_usd = 1\nmode = "block"', "[[budgets]] 'b4': mode:"),
        ('name = "b5"\nwindow = "day"\nlimit_usd = 1\nalert_at = [0.5, 1.5]', "[[budgets]] 'b5': alert_at: alert_at 1.5 is outside (0, 1]"),
        ('name = "b6"\nwindow = "day"\nlimit_usd = 1\nalert_at = [0]', "[[budgets]] 'b6': alert_at: alert_at 0.0 is outside (0, 1]"),
        ('name = "b7"\nmatch = { "tag:bad name" = "x" }\nwindow = "day"\nlimit_usd = 1', "[[budgets]] 'b7': match: unknown match field 'tag:bad name'"),
        ('window = "day"\nlimit_usd = 1', "[[budgets]] entry 1: name: Field required"),
        ('name = "b9"\nwindow = "day"\nlimit_usd = 1\nlimt = 2', "[[budgets]] 'b9': limt: Extra inputs are not permitted"),
    ],
)
def test_a_bad_budget_is_refused_at_start_up_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, says: str) -> None:
    config = write_config(tmp_path / "meter.toml", "[[budgets]]\n" + entry + "\n")
    assert main(["serve", "--config", config, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--ledger", str(tmp_path / "l.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "l.duckdb").exists()  # refused before anything was opened


def test_a_bad_budget_exits_2_from_the_real_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "meter.toml", '[[budgets]]\nname = "x"\nwindow = "fortnight"\nlimit_usd = 5\n')
    proc = subprocess.run([sys.executable, "-m", "meter", "serve", "--config", config], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "[[budgets]] 'x': window" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("key", ["team-serach", "sk-proj-Zq8Wm3Lp9Xr2Tb7NkQ4v"])
def test_a_budget_whose_key_matches_no_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    # A typo of a name in [keys] (or a raw key pasted in) matched no request: the budget
    # showed $0 and never refused.  A key_id or a configured name is taken, in any order.
    keys = '[keys]\n"aa323243373c9b74" = "team-search"\n'
    budget = f'[[budgets]]\nname = "b"\nmatch = {{ key = "{key}" }}\nwindow = "day"\nlimit_usd = 1\n'
    config = write_config(tmp_path / "meter.toml", budget + keys)
    assert main(["budgets", "--config", config, "--ledger", str(tmp_path / "l.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[[budgets]] 'b': match.key is neither a key_id" in err and key not in err, err
    from meter.config import load_settings

    for good in ("team-search", "aa323243373c9b74", "0123456789abcdef"):
        config = write_config(tmp_path / "ok.toml", budget.replace(key, good) + keys)
        [taken] = load_settings({"config": config}, env={}).budgets
        assert taken.match == {"key": good}


def test_two_budgets_with_one_name_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = '[[budgets]]\nname = "same"\nwindow = "day"\nlimit_usd = 1\n'
    config = write_config(tmp_path / "meter.toml", one + one)
    assert main(["budgets", "--config", config, "--ledger", str(tmp_path / "l.duckdb")]) == 2
    assert "[[budgets]] 'same': a budget of that name is already defined" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a\\nb", "a\\rb", "tab\\u0000", "del\\u007f", "c1\\u0085"])
def test_a_budget_name_with_a_control_character_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    # The name is the `Meter-Budget` header of a refusal: with a line break there, the
    # answer could not be sent and the SDK saw a connection error, not a RateLimitError.
    config = write_config(tmp_path / "meter.toml", f'[[budgets]]\nname = "{name}"\nwindow = "day"\nlimit_usd = 1\nmode = "enforce"\n')
    assert main(["budgets", "--config", config, "--ledger", str(tmp_path / "l.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name: a budget's name has no control characters" in err, err


# --- windows --------------------------------------------------------------------------


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def test_calendar_windows_in_utc() -> None:
    now = ts("2026-03-04T15:30:00")  # a Wednesday
    assert window_bounds("day", now) == (dt.datetime(2026, 3, 4, tzinfo=dt.UTC), dt.datetime(2026, 3, 5, tzinfo=dt.UTC))
    assert window_bounds("week", now) == (dt.datetime(2026, 3, 2, tzinfo=dt.UTC), dt.datetime(2026, 3, 9, tzinfo=dt.UTC))
    assert window_bounds("month", now) == (dt.datetime(2026, 3, 1, tzinfo=dt.UTC), dt.datetime(2026, 4, 1, tzinfo=dt.UTC))
    assert window_bounds("month", ts("2026-12-31T23:59:59")) == (dt.datetime(2026, 12, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
    assert window_bounds("week", ts("2026-03-02T00:00:00"))[0] == dt.datetime(2026, 3, 2, tzinfo=dt.UTC)  # Monday opens its own week
    assert window_bounds("week", ts("2026-03-01T23:59:59"))[0] == dt.datetime(2026, 2, 23, tzinfo=dt.UTC)  # Sunday ends the last one
    assert seconds_to_reset(ts("2026-03-05T00:00:00"), ts("2026-03-04T23:59:58.2")) == 2
    assert seconds_to_reset(ts("2026-03-05T00:00:00"), ts("2026-03-05T00:00:00")) == 1


def record(i: int, cost: str | None, started: float, **fields: Any) -> Record:
    r = Record(id=None, started_at=started, finished_at=started + 0.1, method="POST", path="/v1/responses", endpoint="responses", **fields)
    r.cost_usd = Decimal(cost) if cost is not None else None
    return r


def test_a_window_that_ends_opens_the_next_at_zero_and_admits_again() -> None:
    t = ts("2026-03-04T23:59:00")
    budgets = Budgets([Budget(name="d", window="day", limit_usd=Decimal(1), mode="enforce")], {}, now=t)
    budgets.add(record(0, "1.5", t))
    assert budgets.blocked and budgets.states[0].spend == Decimal("1.5")
    budgets.add(record(1, "0.25", t - 86400))  # yesterday's: not this window's
    assert budgets.states[0].spend == Decimal("1.5")
    budgets.roll(t + 59)
    assert budgets.blocked  # still the same day
    budgets.roll(t + 60)
    assert not budgets.blocked and budgets.states[0].spend == 0
    assert budgets.states[0].start == dt.datetime(2026, 3, 5, tzinfo=dt.UTC)


def test_observe_never_blocks_and_alerts_cross_once_per_window() -> None:
    seen: list[Any] = []

    class Recorder:
        def crossed(self, crossing: Any) -> None:
            seen.append(crossing)

    t = ts("2026-03-04T12:00:00")
    budgets = Budgets([Budget(name="o", window="day", limit_usd=Decimal(1), alert_at=(0.5, 0.8, 1.0))], {}, alerter=Recorder(), now=t)
    budgets.add(record(0, "0.6", t))
    budgets.add(record(1, "0.1", t))
    budgets.add(record(2, "0.5", t))
    assert not budgets.blocked
    assert [(c.budget, c.threshold, c.spend_usd, c.limit_usd, c.mode) for c in seen] == [
        ("o", 0.5, Decimal("0.6"), Decimal(1), "observe"),
        ("o", 0.8, Decimal("1.2"), Decimal(1), "observe"),
        ("o", 1.0, Decimal("1.2"), Decimal(1), "observe"),
    ]
    assert all(c.window_start == dt.datetime(2026, 3, 4, tzinfo=dt.UTC) for c in seen)
    budgets.roll(t + 86400)
    budgets.add(record(3, "0.5", t + 86400))
    assert [c.threshold for c in seen[3:]] == [0.5]  # the next window alerts afresh


# --- the three ways of matching agree ----------------------------------------------------


MATCHES = [
    {},
    {"key": "team-search"},
    {"key": "0123456789abcdef"},
    {"project": "proj_a"},
    {"user": "u1"},
    {"model": "gpt-4o"},
    {"tag:team": "search"},
    {"key": "team-search", "tag:team": "search", "model": "gpt-4o"},
]


def test_record_matching_and_the_ledgers_sql_agree(tmp_path: Path) -> None:
    kid = key_id(SECRET_KEY)
    names = {kid: "team-search"}
    t = time.time()
    records = [
        record(0, "0.1", t, key_id=kid, model_requested="gpt-4o", model="gpt-4o-2024-08-06", tags='{"team": "search"}'),
        record(1, "0.2", t, key_id="0123456789abcdef", project="proj_a", user_id="u1", model="gpt-4o"),  # a retrieve: no model asked
        record(2, "0.4", t, key_id=kid, model_requested="gpt-4o-mini", tags='{"team": "ads", "x": "y"}'),
        record(3, None, t, key_id=kid, model_requested="gpt-4o"),  # unpriced: adds nothing
        record(4, "0.8", t, project="proj_a", user_id="u2", tags='{"team": "search"}'),
        record(5, "1.6", t - 40 * 86400, key_id=kid, model_requested="gpt-4o"),  # another month
    ]
    from meter.ledger.schema import random_uuids

    for r, id_ in zip(records, random_uuids(len(records)), strict=True):
        r.id = id_
    store = DuckDBStore(str(tmp_path / "m.duckdb"))
    store.open()
    store.write(records)
    budgets = [Budget(name=f"b{i}", window="month", limit_usd=Decimal(1), match=m) for i, m in enumerate(MATCHES)]
    matchers = [matcher_for(b, names) for b in budgets]
    windows = [window_bounds("month", t)] * len(budgets)
    in_sql = read_spend(store, matchers, windows, None)
    store.close()
    for m, sql_sum in zip(matchers, in_sql, strict=True):
        in_memory = sum((r.cost_usd or 0 for r in records[:5] if m.matches_record(r)), Decimal(0))
        assert sql_sum == in_memory, m
    assert in_sql[0] == Decimal("1.5") and in_sql[1] == Decimal("0.5") and in_sql[5] == Decimal("0.3") and in_sql[6] == Decimal("0.9")
    assert in_sql[7] == Decimal("0.1")


def test_spend_per_budget_is_the_matchers_own_decision_for_every_combination() -> None:
    """`Budgets.add` decides matching once per (key, project, user, model, tags) and reuses it: each
    budget's spend is still the sum of the records its matcher matches, record by record, and the
    map of decisions stays within its bounds whatever values clients send."""
    from meter.budgets import spend

    kid = key_id(SECRET_KEY)
    names = {kid: "team-search"}
    t = time.time()
    budgets = Budgets([Budget(name=f"b{i}", window="month", limit_usd=Decimal(10**6), match=m) for i, m in enumerate(MATCHES)], names, now=t)
    shapes = [
        {"key_id": kid, "model_requested": "gpt-4o", "model": "gpt-4o-2024-08-06", "tags": '{"team": "search"}'},
        {"key_id": "0123456789abcdef", "project": "proj_a", "user_id": "u1", "model": "gpt-4o"},
        {"key_id": kid, "model_requested": "gpt-4o-mini", "tags": '{"team": "ads", "x": "y"}'},
        {"project": "proj_a", "user_id": "u2", "tags": '{"team": "search"}'},
        {"key_id": kid, "model_requested": "gpt-4o", "tags": "not json"},
        {"key_id": kid, "model_requested": "gpt-4o" + "x" * 600, "tags": '{"team": "search"}'},  # too long to keep
    ]
    records = [record(i, f"0.00{i % 7 + 1}", t, **shapes[i % len(shapes)]) for i in range(60)]
    for r in records:
        budgets.add(r)
    for state in budgets.states:
        assert state.spend == sum((r.cost_usd for r in records if state.matcher.matches_record(r)), Decimal(0)), state.name
    assert len(budgets._matched) == len(shapes) - 1  # the long one is matched afresh each time
    for i in range(spend._MATCHED_MAX + 10):
        budgets.add(record(i, "0", t, model_requested=f"model-{i}"))
    assert 0 < len(budgets._matched) <= spend._MATCHED_MAX


def test_counted_records_get_marked_version_4_ids() -> None:
    import uuid

    t = time.time()
    budgets = Budgets([Budget(name="all", window="month", limit_usd=Decimal(10**6))], {}, now=t)
    records = [record(i, "0.001", t) for i in range(600)]  # more than one refill
    for r in records:
        budgets.add(r)
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids)
    for id_ in ids:
        assert id_ is not None and id_.startswith(budgets.prefix)
        u = uuid.UUID(id_)
        assert str(u) == id_ and u.version == 4 and u.variant == uuid.RFC_4122
    # The random part is random: every hex digit in every random position, and all four variants.
    assert {id_[19] for id_ in ids} == set("89ab")
    assert all(len({id_[at] for id_ in ids}) == 16 for at in (15, 16, 17, 20, 21, 22, *range(24, 36)))


def test_alerts_cross_from_the_ledgers_spend_too_and_a_limit_blocks_at_once() -> None:
    seen: list[Any] = []

    class Recorder:
        def crossed(self, crossing: Any) -> None:
            seen.append(crossing)

    t = ts("2026-03-04T12:00:00")
    budgets = Budgets([Budget(name="e", window="day", limit_usd=Decimal(1), mode="enforce", alert_at=(0.25, 0.5))], {}, alerter=Recorder(), now=t)
    budgets.add(record(0, "0.2", t))
    assert seen == [] and not budgets.blocked
    budgets.set_others(budgets.windows(), [Decimal("0.1")])  # 0.3: past a quarter
    assert [(c.threshold, c.spend_usd) for c in seen] == [(0.25, Decimal("0.3"))]
    budgets.add(record(1, "0.69", t))
    assert not budgets.blocked and [c.threshold for c in seen] == [0.25, 0.5]
    budgets.add(record(2, "0.01", t))  # exactly the limit
    assert budgets.blocked and len(seen) == 2
    budgets.set_others(budgets.windows(), [Decimal(0)])  # the ledger's part shrank: under the limit again
    assert not budgets.blocked


def test_refusals_and_alerts_follow_spend_step_by_step_whichever_way_it_moves() -> None:
    """What the budgets do after each record and each read of the ledger's spend, against the rule
    written plainly: an enforcing budget refuses while spend >= limit, and each alert share fires once
    per window, at the first step whose spend reaches it.  Costs of either sign and ledger reads
    that shrink exercise every edge of the range in which a record needs no check."""
    import random

    seen: list[tuple[str, float, Decimal]] = []

    class Recorder:
        def crossed(self, crossing: Any) -> None:
            seen.append((crossing.budget, crossing.threshold, crossing.spend_usd))

    rng = random.Random(11)
    t = ts("2026-03-04T12:00:00")
    configs = [
        Budget(name="e", window="day", limit_usd=Decimal(1), mode="enforce", alert_at=(0.25, 0.5, 0.9)),
        Budget(name="o", window="day", limit_usd=Decimal(2), alert_at=(0.5, 1.0)),
        Budget(name="m", window="day", limit_usd=Decimal("0.5"), mode="enforce", match={"model": "gpt-4o"}),
        Budget(name="q", window="day", limit_usd=Decimal(3)),
    ]
    budgets = Budgets(configs, {}, alerter=Recorder(), now=t)
    own = {b.name: Decimal(0) for b in configs}
    others = {b.name: Decimal(0) for b in configs}
    fired: set[tuple[str, float]] = set()
    for step in range(400):
        want: list[tuple[str, float, Decimal]] = []
        if rng.random() < 0.15:
            sums = [Decimal(rng.randrange(0, 150)) / 100 for _ in configs]
            budgets.set_others(budgets.windows(), sums)
            changed = [b.name for b in configs]
            others = {b.name: v for b, v in zip(configs, sums, strict=True)}
        else:
            cost = Decimal(rng.randrange(-12, 13)) / 100  # a walk around zero: spend crosses the limits both ways
            model = rng.choice(["gpt-4o", "gpt-5"])
            budgets.add(record(step, str(cost), t, model_requested=model))
            changed = [b.name for b in configs if b.match.get("model", model) == model]
            for name in changed:
                own[name] += cost
        for b in configs:
            spend = own[b.name] + others[b.name]
            if b.name in changed:
                for share in b.alert_at:
                    if (b.name, share) not in fired and spend >= b.limit_usd * Decimal(str(share)):
                        fired.add((b.name, share))
                        want.append((b.name, share, spend))
        got, seen[:] = list(seen), []
        assert got == want, step
        assert {s.name for s in budgets.blocked} == {b.name for b in configs if b.mode == "enforce" and own[b.name] + others[b.name] >= b.limit_usd}, step
    assert fired and any(b.mode == "enforce" for b in configs)


# --- end to end: the official SDK through meter ---------------------------------------------


async def test_enforce_refuses_once_spend_reaches_the_limit(upstream, start_meter, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "meter.toml",
        '[[budgets]]\nname = "search-daily"\nmatch = { key = "team-search" }\nwindow = "day"\nlimit_usd = 0.001\nmode = "enforce"\n'
        '[[budgets]]\nname = "watch"\nwindow = "month"\nlimit_usd = 0.000001\nmode = "observe"\n',
        keys={key_id(SECRET_KEY): "team-search"},
    )
    meter = await start_meter(upstream.url, config=config)
    await clear_upstream_requests(upstream.url)
    client = sdk(meter.url)
    # Under the limit every request goes through, however close the next one would take it.
    first = await client.responses.create(model="gpt-4o", input="hi", extra_headers=USAGE)
    assert first.usage is not None
    state = meter.meter.budgets.states[0]
    spent = state.spend
    assert spent > Decimal("0.001")  # 1000 input + 500 output tokens of gpt-4o: past the limit
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="gpt-4o", input="again", extra_headers=USAGE)
    response = refused.value.response
    assert response.status_code == 429
    assert response.headers["Meter-Budget"] == "search-daily"
    reset = int(response.headers["Retry-After"])
    start, end = window_bounds("day", time.time())
    assert 0 < reset <= (end - dt.datetime.now(dt.UTC)).total_seconds() + 1
    body = response.json()
    assert body["error"]["type"] == ERROR_TYPE == "meter_budget_exceeded" and body["error"]["code"] == ERROR_CODE == "budget_exceeded"
    assert body["error"]["param"] is None and "search-daily" in body["error"]["message"]
    assert refused.value.code == "budget_exceeded"
    # A stream is refused the same way, before anything is sent.
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="gpt-4o", input="s", stream=True)
    # Another key does not match the budget: it goes on (the observe budget never refuses).
    other = await sdk(meter.url, OTHER_KEY).responses.create(model="gpt-4o", input="x", extra_headers=USAGE)
    assert other.usage is not None
    assert len(await upstream_requests(upstream.url)) == 2  # the refused requests never reached it
    rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["completed", "rejected", "rejected", "completed"]
    for row in rows[1:3]:
        assert row["status_code"] == 429 and row["error_type"] == "meter_budget_exceeded" and row["error_code"] == "budget_exceeded"
        assert row["input_tokens"] is None and row["cost_usd"] is None and row["model_requested"] == "gpt-4o"
    # Spend is exactly the ledger's sum: this replica's records counted once.
    assert state.spend == rows[0]["cost_usd"] == spent
    assert meter.meter.budgets.states[1].spend == rows[0]["cost_usd"] + rows[3]["cost_usd"]
    assert state.rejections == 2 and meter.meter.budgets.states[1].rejections == 0

    async with aiohttp.ClientSession() as http:
        async with http.get(meter.admin_url + "/metrics") as r:
            text = await r.text()
        async with http.get(meter.admin_url + "/api/budgets") as r:
            api = await r.json(loads=lambda s: json.loads(s, parse_float=Decimal))
    assert 'meter_budget_rejections_total{budget="search-daily"} 2.0' in text
    assert 'meter_budget_limit_usd{budget="search-daily"} 0.001' in text
    assert f'meter_budget_spend_usd{{budget="search-daily"}} {float(spent)}' in text
    assert [b["budget"] for b in api] == ["search-daily", "watch"]
    assert api[0]["spend_usd"] == spent and api[0]["limit_usd"] == Decimal("0.001") and api[0]["remaining_usd"] == 0
    assert api[0]["state"] == "exceeded" and api[1]["state"] == "over" and api[0]["window_start"] == start.isoformat()


async def test_spend_is_read_from_the_ledger_at_start_before_the_first_request(upstream, start_meter, tmp_path: Path) -> None:
    config = write_config(tmp_path / "meter.toml", '[[budgets]]\nname = "all"\nwindow = "week"\nlimit_usd = 0.001\nmode = "enforce"\n')
    ledger = str(tmp_path / "restart.duckdb")
    first = await start_meter(upstream.url, config=config, ledger=ledger)
    await sdk(first.url).responses.create(model="gpt-4o", input="hi", extra_headers=USAGE)
    [row] = await first.rows()
    await first.stop()
    again = await start_meter(upstream.url, config=config, ledger=ledger)
    assert again.meter.budgets.states[0].spend == row["cost_usd"]  # an earlier run's rows count
    # The SDK retries a 429 (max_retries, default 2), but not when Retry-After is past two
    # minutes, as it is here (a week's window): one try, refused, recorded.
    retrying = openai.AsyncOpenAI(base_url=again.url + "/v1", api_key=SECRET_KEY, max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        await retrying.responses.create(model="gpt-4o", input="hi")
    assert int(refused.value.response.headers["Retry-After"]) > 120 or time.monotonic() - started > 0.3
    # What adds nothing to spend is never refused: a client can fetch, or cancel, what it started.
    fetched = await sdk(again.url).responses.retrieve(row["response_id"])
    assert fetched.id == row["response_id"]
    models = await sdk(again.url).models.list()
    assert models.data
    rows = await again.rows()
    assert [r["outcome"] for r in rows] == ["completed", "rejected", "completed", "completed"], [(r["outcome"], r["endpoint"], r["status_code"]) for r in rows]
    assert [r["endpoint"] for r in rows[2:]] == ["responses.retrieve", "other"]
    assert again.meter.budgets.states[0].spend == row["cost_usd"]


async def test_listing_stored_chat_completions_is_never_refused(upstream, start_meter, tmp_path: Path) -> None:
    # GET /v1/chat/completions lists the stored completions: it is on a model call's path
    # but adds nothing to spend, like a retrieve.
    config = write_config(tmp_path / "meter.toml", '[[budgets]]\nname = "all"\nwindow = "day"\nlimit_usd = 0.000001\nmode = "enforce"\n')
    meter = await start_meter(upstream.url, config=config)
    client = sdk(meter.url)
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert meter.meter.budgets.blocked
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "again"}])
    await clear_upstream_requests(upstream.url)
    with pytest.raises(openai.NotFoundError):  # the fake provider has no such list: its 404, not meter's 429
        await client.chat.completions.list()
    [listed] = await upstream_requests(upstream.url)
    assert listed["method"] == "GET"
    assert [r["outcome"] for r in await meter.rows()] == ["completed", "rejected", "error"]


async def test_tag_and_model_matches_read_the_request(upstream, start_meter, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "meter.toml",
        '[[budgets]]\nname = "feature"\nmatch = { "tag:feature" = "autocomplete", model = "gpt-4o" }\nwindow = "day"\nlimit_usd = 0.000001\nmode = "enforce"\n',
    )
    meter = await start_meter(upstream.url, config=config)
    client = sdk(meter.url)
    await client.responses.create(model="gpt-4o", input="a", metadata={"feature": "autocomplete"}, extra_headers=USAGE)
    assert meter.meter.budgets.blocked
    with pytest.raises(openai.RateLimitError):  # the tag from a header, the model from the body
        await client.responses.create(model="gpt-4o", input="b", extra_headers={"Meter-Tag-Feature": "autocomplete"})
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="gpt-4o", input="b", metadata={"feature": "autocomplete"})
    # A header wins over the metadata, another model or no tag do not match: all go on.
    await client.responses.create(model="gpt-4o", input="c", metadata={"feature": "autocomplete"}, extra_headers={"Meter-Tag-Feature": "chat"})
    await client.responses.create(model="gpt-4o-mini", input="d", metadata={"feature": "autocomplete"})
    await client.responses.create(model="gpt-4o", input="e")
    rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["completed", "rejected", "rejected", "completed", "completed", "completed"]


async def test_the_budgets_command_over_the_admin_api_and_the_ledger(upstream, start_meter, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "meter.toml",
        '[[budgets]]\nname = "monthly"\nwindow = "month"\nlimit_usd = 100\nmode = "enforce"\nalert_at = [0.5]\n'
        '[[budgets]]\nname = "nothing"\nmatch = { project = "none" }\nwindow = "day"\nlimit_usd = 2.5\n',
    )
    ledger = str(tmp_path / "cmd.duckdb")
    meter = await start_meter(upstream.url, config=config, ledger=ledger)
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi", extra_headers=USAGE)
    [row] = await meter.rows()
    cost = row["cost_usd"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meter", "budgets", *args], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})

    loop = asyncio.get_running_loop()
    as_json = await loop.run_in_executor(None, run, "--url", meter.admin_url, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout, parse_float=Decimal)
    assert [r["budget"] for r in rows] == ["monthly", "nothing"]
    assert rows[0]["spend_usd"] == cost and rows[0]["remaining_usd"] == 100 - cost and rows[0]["state"] == "ok"
    assert float(rows[0]["share"]) == pytest.approx(float(cost / 100)) and rows[1]["spend_usd"] == 0 and rows[1]["mode"] == "observe"
    table = await loop.run_in_executor(None, run, "--url", meter.admin_url)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["budget", "window", "window_start", "window_end", "mode", "spend_usd", "limit_usd", "remaining_usd", "share", "state"]
    assert lines[1].split()[0] == "monthly" and lines[1].split()[5] == str(cost.normalize()) and len(lines) == 3
    await meter.stop()
    as_csv = await loop.run_in_executor(None, run, "--ledger", ledger, "--config", config, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    header, monthly, nothing = as_csv.stdout.splitlines()
    assert header.startswith("budget,window,") and monthly.startswith("monthly,month,") and Decimal(monthly.split(",")[5]) == cost
    assert nothing.split(",")[-1] == "ok"
    unreachable = await loop.run_in_executor(None, run, "--url", "http://127.0.0.1:1")
    assert unreachable.returncode == 2 and unreachable.stderr.startswith("meter: error: --url: cannot reach") and unreachable.stderr.count("\n") == 1


async def test_a_websocket_response_create_is_refused_with_an_error_event(upstream, start_meter, tmp_path: Path) -> None:
    config = write_config(tmp_path / "meter.toml", '[[budgets]]\nname = "ws"\nwindow = "day"\nlimit_usd = 0.001\nmode = "enforce"\n')
    meter = await start_meter(upstream.url, config=config)
    usage = {"input_tokens": 1000, "output_tokens": 500}
    async with aiohttp.ClientSession() as http, http.delete(upstream.url + "/__fake/ws") as r:
        assert r.status in (200, 204)
    async with sdk(meter.url).responses.connect() as conn:
        # Under the limit: the first response runs to its end.
        await conn.response.create(model="gpt-4o", input="one", metadata={"fake_usage": usage})  # type: ignore[dict-item]
        while (event := conn.parse_event(await asyncio.wait_for(conn.recv_bytes(), 10))).type != "response.completed":
            pass
        assert meter.meter.budgets.blocked
        # Past it: the next is answered by meter, on the same socket, which stays open.
        await conn.response.create(model="gpt-4o", input="two", metadata={"fake_usage": usage})  # type: ignore[dict-item]
        raw = json.loads(await asyncio.wait_for(conn.recv_bytes(), 10))
        assert raw["type"] == "error" and raw["status"] == 429
        assert raw["error"]["type"] == "meter_budget_exceeded" and raw["error"]["code"] == "budget_exceeded" and "'ws'" in raw["error"]["message"]
        event = conn.parse_event(json.dumps(raw).encode())
        assert event.type == "error"
    rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["completed", "rejected"]
    rejected = rows[1]
    assert rejected["transport"] == "websocket" and rejected["status_code"] == 429 and rejected["error_code"] == "budget_exceeded"
    assert rejected["input_tokens"] is None and rejected["model_requested"] == "gpt-4o"
    async with aiohttp.ClientSession() as http, http.get(upstream.url + "/__fake/ws") as r:
        [socket] = [ws for ws in await r.json() if ws["path_qs"].startswith("/v1/responses")][-1:]
    assert socket["messages"] == 1  # the refused response.create never reached the upstream


async def test_reads_between_full_reads_add_only_recent_rows_and_never_twice(tmp_path: Path) -> None:
    from meter.budgets.sync import BudgetSync
    from meter.ledger.schema import random_uuids

    now = time.time()
    start, _ = window_bounds("month", now)
    if now - start.timestamp() < 120:
        pytest.skip("the month began a moment ago: no room for rows before the cutoff")
    store = DuckDBStore(str(tmp_path / "sync.duckdb"))
    store.open()

    def write(*rows: Record) -> None:
        for r, id_ in zip(rows, random_uuids(len(rows)), strict=True):
            r.id = r.id or id_  # as the ledger writer does: an id already given is kept
        store.write(rows)

    budgets = Budgets([Budget(name="m", window="month", limit_usd=Decimal(100))], {})
    sync = BudgetSync(budgets, store, 0.05, full_read_every=3600, recent=30)
    write(record(0, "1", now - 60), record(1, "2", now - 5))  # before and after the cutoff
    assert await sync.sync()
    assert budgets.states[0].spend == 3
    write(record(2, "4", now - 1))  # recent: the next read has it
    assert await sync.sync()
    assert budgets.states[0].spend == 7
    write(record(3, "8", now - 90))  # before the cutoff, written after the full read: the next full read
    assert await sync.sync()
    assert budgets.states[0].spend == 7
    sync.full_read_every = 0
    assert await sync.sync()
    assert budgets.states[0].spend == 15
    sync.full_read_every = 3600
    assert await sync.sync()  # a read between full reads again: the same sum, nothing twice
    assert budgets.states[0].spend == 15
    # This process's own records (their ids carry its mark) are counted by it, never read back.
    own = record(4, "16", now - 1)
    budgets.add(own)
    assert own.id is not None and own.id.startswith(budgets.prefix)
    write(own)
    assert await sync.sync()
    assert budgets.states[0].spend == 31
    store.close()


def test_url_a_redirect_is_refused_and_the_admin_token_stays_home() -> None:
    with redirect_elsewhere(302) as redirect:
        result = run_meter_env({"METER_ADMIN_TOKEN": "budgets-SECRET"}, "budgets", "--url", redirect.url)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result
    assert result.stderr.startswith(f"meter: error: --url: {redirect.url} answered HTTP 302") and "does not follow redirects" in result.stderr
    assert redirect.reached == [] and "budgets-SECRET" not in result.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://[::1", "http://exa mple"])
def test_url_malformed_is_one_line_exit_2(url: str) -> None:
    result = run_meter_env({}, "budgets", "--url", url)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result
    assert result.stderr.startswith("meter: error: --url: ") and "Traceback" not in result.stderr
