"""Budget alerts (SPEC §11): one webhook event per budget, window and threshold, exactly once.

Real parts only: the webhook receiver is its own process (tests/webhook_receiver.py),
the ledgers are DuckDB files and a real PostgreSQL (tests/pg.py), and the
end-to-end cases send requests with the official SDK through real meters to
the fake provider, so the crossings come from the budget tracker itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from meter.budgets.alerts import Alerter, AlertMetrics, Crossing
from meter.budgets.webhook import fingerprint
from meter.config import SettingError, load_settings
from meter.ledger import DuckDBStore, PostgresStore, Store
from meter.ledger.alert_claims import AlertClaim

from .conftest import ROOT, SECRET_KEY, UpstreamProcess

WINDOW = datetime(2026, 11, 1, tzinfo=UTC)
USAGE = {"x-fake-usage": json.dumps({"input_tokens": 1000, "output_tokens": 500})}


def crossing(threshold: float = 0.8, budget: str = "search-monthly", spend: str = "400.12") -> Crossing:
    return Crossing(budget, WINDOW, threshold, Decimal(spend), Decimal(500), "enforce")


@pytest.fixture
def receiver() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess("tests.webhook_receiver").start()
    yield proc
    proc.stop()


@pytest.fixture
def second_receiver() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess("tests.webhook_receiver").start()
    yield proc
    proc.stop()


async def received(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url + "/__received") as answer:
        return await answer.json()


async def set_mode(url: str, **mode: float) -> None:
    async with aiohttp.ClientSession() as http, http.put(url + "/__mode", json=mode) as answer:
        assert answer.status == 200


async def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll an async `check` until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def accepted(posts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in posts if p["status"] == 200]


def claims(store: Store) -> list[dict[str, Any]]:
    names, rows = store.query("SELECT * FROM alert_claims ORDER BY budget, threshold")
    return [dict(zip(names, row)) for row in rows]


@pytest.fixture
async def duckdb_store(tmp_path: Path) -> AsyncIterator[DuckDBStore]:
    store = DuckDBStore(str(tmp_path / "alerts.duckdb"))
    store.open()
    yield store
    store.close()


# --- the alerter on a real ledger ---------------------------------------------------------


async def test_each_alert_is_posted_once_with_every_field(duckdb_store: DuckDBStore, receiver: UpstreamProcess) -> None:
    alerter = Alerter(duckdb_store, [receiver.url + "/hook"])
    await alerter.start(owner="replica-a")
    try:
        for _ in range(3):  # the tracker may report one crossing again: it goes out once
            alerter.crossed(crossing(0.8))
        alerter.crossed(crossing(1.0, spend="500.5"))
        posts = await wait_for(lambda: _at_least(receiver.url, 2), what="two alerts")
        await asyncio.sleep(0.5)
        assert len(await received(receiver.url)) == 2
    finally:
        await alerter.stop()
    by_threshold = {p["json"]["threshold"]: p for p in posts}
    event = by_threshold[0.8]["json"]
    assert event == {
        "budget": "search-monthly",
        "window_start": "2026-11-01T00:00:00Z",
        "threshold": 0.8,
        "spend_usd": 400.12,
        "limit_usd": 500.0,
        "mode": "enforce",
        "text": "meter: budget search-monthly has reached 80% of its limit: $400.12 of $500.00 spent since 2026-11-01 00:00 UTC (enforce)",
    }
    assert "refused until the window ends" in by_threshold[1.0]["json"]["text"]
    headers = by_threshold[0.8]["headers"]
    assert headers["Content-Type"] == "application/json" and len(headers["Meter-Alert-Id"]) == 32
    assert headers["Meter-Alert-Id"] != by_threshold[1.0]["headers"]["Meter-Alert-Id"]
    assert by_threshold[0.8]["path"] == "/hook"
    rows = claims(duckdb_store)
    assert [(r["threshold"], r["claimed_by"], r["delivered"]) for r in rows] == [
        (0.8, "replica-a", fingerprint(receiver.url + "/hook")),
        (1.0, "replica-a", fingerprint(receiver.url + "/hook")),
    ]
    assert all(r["sent_at"] is not None and r["spend_usd"] in (Decimal("400.12"), Decimal("500.5")) for r in rows)
    assert alerter.sent == {"search-monthly": 2} and alerter.failures == {}
    families = {f.name: f for f in AlertMetrics(alerter).collect()}
    assert [(s.name, s.labels, s.value) for s in families["meter_alerts_sent"].samples] == [
        ("meter_alerts_sent_total", {"budget": "search-monthly"}, 2.0)
    ]


async def _at_least(url: str, n: int, status: int | None = None) -> list[dict[str, Any]] | None:
    posts = await received(url)
    counted = posts if status is None else [p for p in posts if p["status"] == status]
    return posts if len(counted) >= n else None


async def test_a_failing_webhook_is_retried_until_it_accepts_and_never_delays_the_caller(
    duckdb_store: DuckDBStore, receiver: UpstreamProcess, second_receiver: UpstreamProcess
) -> None:
    await set_mode(receiver.url, fail=2, status=500, delay=0.3)
    failing, healthy = receiver.url + "/failing", second_receiver.url + "/ok"
    alerter = Alerter(duckdb_store, [failing, healthy], first_retry=0.2)
    await alerter.start(owner="replica-a")
    try:
        started = time.perf_counter()
        alerter.crossed(crossing(0.5))
        took = time.perf_counter() - started
        assert took < 0.001, f"crossed() took {took * 1e6:.0f} µs"  # it only queues
        await wait_for(lambda: _at_least(receiver.url, 1, status=500), what="the first failure")
        assert claims(duckdb_store)[0]["sent_at"] is None  # not delivered everywhere yet
        await wait_for(lambda: _at_least(receiver.url, 1, status=200), what="the retry that succeeds")
        await wait_for(lambda: asyncio.sleep(0, result=claims(duckdb_store)[0]["sent_at"] is not None), what="sent_at")
    finally:
        await alerter.stop()
    posts = await received(receiver.url)
    assert [p["status"] for p in posts] == [500, 500, 200]
    assert len({p["headers"]["Meter-Alert-Id"] for p in posts}) == 1  # one alert, retried
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(posts)]
    assert gaps[1] > gaps[0] * 1.3, f"backoff grows: {gaps}"
    assert len(await received(second_receiver.url)) == 1  # the webhook that accepted is not sent it again
    assert alerter.sent == {"search-monthly": 2} and alerter.failures == {"search-monthly": 2}
    row = claims(duckdb_store)[0]
    assert set(row["delivered"].split()) == {fingerprint(failing), fingerprint(healthy)}
    assert "127.0.0.1" not in row["delivered"]  # fingerprints, never the URLs


async def test_a_2xx_whose_body_is_slow_is_accepted_once_not_timed_out_and_resent(duckdb_store: DuckDBStore, receiver: UpstreamProcess) -> None:
    # The receiver sends `200` and its headers at once and its body 30 s later (it
    # streams its answer, or works before finishing it): the event was accepted.
    await set_mode(receiver.url, stall=30)
    alerter = Alerter(duckdb_store, [receiver.url], first_retry=0.1, timeout=1.0)
    await alerter.start(owner="replica-a")
    try:
        alerter.crossed(crossing(0.8))
        await wait_for(lambda: asyncio.sleep(0, result=bool(claims(duckdb_store)) and claims(duckdb_store)[0]["sent_at"] is not None), timeout=5, what="sent_at")
        await asyncio.sleep(1.5)  # past the timeout: nothing is sent again
    finally:
        await alerter.stop()
    assert len(await received(receiver.url)) == 1
    assert alerter.sent == {"search-monthly": 1} and alerter.failures == {}


async def test_a_spend_past_the_claims_column_is_claimed_and_sent(duckdb_store: DuckDBStore, receiver: UpstreamProcess) -> None:
    # Spend is a sum of rows, each within DECIMAL(18,9), and can pass the column itself
    # (12.5 billion here): the claim must still be written, or the alert is retried for ever.
    alerter = Alerter(duckdb_store, [receiver.url], first_retry=0.1)
    await alerter.start(owner="replica-a")
    try:
        alerter.crossed(crossing(1.0, spend="12500000000.000238750"))
        await wait_for(lambda: asyncio.sleep(0, result=bool(claims(duckdb_store)) and claims(duckdb_store)[0]["sent_at"] is not None), timeout=10, what="sent_at")
    finally:
        await alerter.stop()
    [post] = await received(receiver.url)
    [row] = claims(duckdb_store)
    largest = Decimal("999999999.999999999")  # what DECIMAL(18,9) holds at most
    assert row["spend_usd"] == largest and post["json"]["spend_usd"] == float(largest)
    assert row["limit_usd"] == Decimal(500) and alerter.failures == {}


def open_store(dialect: str, where: str) -> Store:
    store: Store = DuckDBStore(where) if dialect == "duckdb" else PostgresStore(where)
    store.open()
    return store


@pytest.mark.parametrize("dialect", ["duckdb", "postgresql"])
async def test_an_alert_unsent_at_stop_is_sent_by_the_next_start(dialect: str, request: pytest.FixtureRequest, tmp_path: Path, receiver: UpstreamProcess) -> None:
    path = str(tmp_path / "restart.duckdb") if dialect == "duckdb" else request.getfixturevalue("pg_url")
    await set_mode(receiver.url, fail=1_000_000)
    store = open_store(dialect, path)
    first = Alerter(store, [receiver.url], first_retry=0.1)
    await first.start(owner="replica-a")
    first.crossed(crossing(0.8))
    await wait_for(lambda: _at_least(receiver.url, 2), what="failures")
    await first.stop()
    [row] = claims(store)
    assert row["sent_at"] is None and row["lease_until"] is None  # released for whoever comes next
    store.close()
    await set_mode(receiver.url, fail=0)
    store = open_store(dialect, path)
    try:
        second = Alerter(store, [receiver.url], first_retry=0.1)
        await second.start(owner="replica-b")  # another replica, or this one under a new name
        try:
            second.crossed(crossing(0.8))  # seen again after the restart: the claim is not made twice
            await wait_for(lambda: _at_least(receiver.url, 1, status=200), what="the resend")
            await asyncio.sleep(0.5)
        finally:
            await second.stop()
        assert len(accepted(await received(receiver.url))) == 1
        [row] = claims(store)
        assert row["sent_at"] is not None and row["claimed_by"] == "replica-b"
    finally:
        store.close()


async def test_a_dead_replicas_claim_waits_for_its_lease_then_is_sent(duckdb_store: DuckDBStore, receiver: UpstreamProcess) -> None:
    # What a replica killed right after its claim leaves: an unsent claim under a lease.
    lease_ends = datetime.now(UTC) + timedelta(seconds=1.5)
    alert = AlertClaim("b", WINDOW, 1.0, Decimal(2), Decimal(1), "observe")
    assert duckdb_store.claim_alert(alert, "dead-replica", lease_ends)
    assert not duckdb_store.claim_alert(alert, "another", lease_ends)  # one claim wins
    alerter = Alerter(duckdb_store, [receiver.url], lease=0.6)
    await alerter.start(owner="replica-b")
    try:
        await asyncio.sleep(1.0)
        assert await received(receiver.url) == []  # the lease still holds
        posts = await wait_for(lambda: _at_least(receiver.url, 1), what="the takeover")
        assert datetime.now(UTC) >= lease_ends
    finally:
        await alerter.stop()
    assert [p["json"]["budget"] for p in posts] == ["b"] and posts[0]["json"]["mode"] == "observe"
    assert claims(duckdb_store)[0]["claimed_by"] == "replica-b"


async def test_the_same_replica_takes_its_own_unsent_claims_back_at_once(duckdb_store: DuckDBStore, receiver: UpstreamProcess) -> None:
    alert = AlertClaim("b", WINDOW, 0.5, Decimal(1), Decimal(2), "enforce")
    assert duckdb_store.claim_alert(alert, "host-1 10.0.0.1:8080", datetime.now(UTC) + timedelta(seconds=60))
    alerter = Alerter(duckdb_store, [receiver.url])
    started = time.monotonic()
    await alerter.start(owner="host-1 10.0.0.1:8080")  # killed and restarted: the same name
    try:
        await wait_for(lambda: _at_least(receiver.url, 1), timeout=5, what="the resend")
    finally:
        await alerter.stop()
    assert time.monotonic() - started < 5  # not after the 60 s lease


# --- across replicas: PostgreSQL ------------------------------------------------------------


async def test_replicas_racing_on_postgresql_send_each_alert_once(pg_url: str, receiver: UpstreamProcess) -> None:
    stores = [PostgresStore(pg_url) for _ in range(3)]
    for store in stores:
        store.open()
    alerters = [Alerter(store, [receiver.url]) for store in stores]
    try:
        for i, alerter in enumerate(alerters):
            await alerter.start(owner=f"replica-{i}")
        thresholds = [round(0.05 * n, 2) for n in range(1, 21)]
        for threshold in thresholds:  # every replica sees every crossing at the same moment
            for alerter in alerters:
                alerter.crossed(crossing(threshold))
        posts = await wait_for(lambda: _at_least(receiver.url, len(thresholds)), what="every alert")
        await asyncio.sleep(1.0)
    finally:
        for alerter in alerters:
            await alerter.stop()
    posts = await received(receiver.url)
    assert sorted(p["json"]["threshold"] for p in posts) == thresholds
    assert sum(sum(a.sent.values()) for a in alerters) == len(thresholds)
    rows = claims(stores[0])
    assert len(rows) == len(thresholds) and all(r["sent_at"] is not None for r in rows)
    for store in stores:
        store.close()


async def test_alerts_waiting_on_a_ledger_that_does_not_answer_leave_the_loops_threads_free(pg_url: str, receiver: UpstreamProcess) -> None:
    # The event loop's default executor also resolves the upstream's host name for a
    # new connection (aiohttp's threaded resolver, loop.getaddrinfo): alerts waiting on
    # a ledger that does not answer must not fill it, or requests wait behind them.
    store = PostgresStore(pg_url, command_timeout=2)
    store.open()
    locker = await asyncpg.connect(pg_url)
    held = locker.transaction()
    await held.start()
    await locker.execute("LOCK TABLE alert_claims IN ACCESS EXCLUSIVE MODE")  # every claim waits
    alerter = Alerter(store, [receiver.url], first_retry=0.2)
    await alerter.start(owner="replica-a")
    thresholds = [n / 40 for n in range(1, 41)]  # more than the default executor's 32 threads at most
    try:
        for threshold in thresholds:
            alerter.crossed(crossing(threshold))
        await asyncio.sleep(3)  # the first scan of the ledger has timed out: the 40 claims are on their way
        started = time.monotonic()
        await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo("localhost", 80), 30)
        assert time.monotonic() - started < 1
        await held.rollback()  # the ledger answers again: every alert goes out, once
        await wait_for(lambda: _at_least(receiver.url, len(thresholds)), timeout=60, what="every alert")
    finally:
        await locker.close()
        await alerter.stop()
        store.close()
    assert sorted(p["json"]["threshold"] for p in await received(receiver.url)) == thresholds


# --- end to end: crossings from the budget tracker of real meters -----------------------------


def alert_config(path: Path, webhooks: list[str], limit: str = "0.001", alert_at: str = "[0.5, 1.0]", mode: str = "enforce") -> str:
    path.write_text(
        f'[[budgets]]\nname = "team-daily"\nwindow = "day"\nlimit_usd = {limit}\nmode = "{mode}"\nalert_at = {alert_at}\n'
        f"[alerts]\nwebhooks = {json.dumps(webhooks)}\n"
    )
    return str(path)


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0)


async def test_two_meters_on_postgresql_crossing_together_alert_once(upstream, start_meter, pg_url: str, receiver: UpstreamProcess, tmp_path: Path) -> None:
    config = alert_config(tmp_path / "meter.toml", [receiver.url + "/slack"])
    meters = [await start_meter(upstream.url, config=config, ledger=pg_url) for _ in range(2)]
    # 1000 input + 500 output tokens of gpt-4o cost more than the whole limit: one request
    # on each meter, at once, takes both past 50% and 100%.
    await asyncio.gather(*(sdk(m.url).responses.create(model="gpt-4o", input="hi", extra_headers=USAGE) for m in meters))
    for m in meters:
        await m.flush()
    await wait_for(lambda: _at_least(receiver.url, 2), what="the two alerts")
    await asyncio.sleep(3 * 0.05 + 1.0)  # both meters have read each other's spend by now
    posts = await received(receiver.url)
    assert sorted(p["json"]["threshold"] for p in posts) == [0.5, 1.0]
    assert all(p["json"]["budget"] == "team-daily" and p["json"]["limit_usd"] == 0.001 for p in posts)
    assert all(" of $0.001 spent since " in p["json"]["text"] for p in posts)  # a small limit is not rounded to cents
    for post in posts:
        assert SECRET_KEY not in post["body"] and SECRET_KEY[-8:] not in post["body"]
        assert all(SECRET_KEY not in value for value in post["headers"].values())
    async with aiohttp.ClientSession() as http:
        scrapes = [await (await http.get(m.admin_url + "/metrics")).text() for m in meters]
    sent = sum(_sample(text, "meter_alerts_sent_total", 'budget="team-daily"') for text in scrapes)
    assert sent == 2
    for m in meters:
        await m.stop()
    rows = PostgresStore(pg_url, migrate=False)
    try:
        assert [(r["threshold"], r["sent_at"] is not None) for r in claims(rows)] == [(0.5, True), (1.0, True)]
    finally:
        rows.close()


def _sample(exposition: str, name: str, labels: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


async def test_a_meter_restarted_with_an_unsent_alert_sends_it_once(upstream, start_meter, receiver: UpstreamProcess, tmp_path: Path) -> None:
    await set_mode(receiver.url, fail=1_000_000)
    config = alert_config(tmp_path / "meter.toml", [receiver.url], alert_at="[1.0]")
    ledger = str(tmp_path / "restart.duckdb")
    first = await start_meter(upstream.url, config=config, ledger=ledger)
    await sdk(first.url).responses.create(model="gpt-4o", input="hi", extra_headers=USAGE)
    await wait_for(lambda: _at_least(receiver.url, 1), what="a failed try")
    await first.stop()  # the webhook never accepted: the claim stays, unsent
    await set_mode(receiver.url, fail=0)
    again = await start_meter(upstream.url, config=config, ledger=ledger)
    await wait_for(lambda: _at_least(receiver.url, 1, status=200), what="the resend")
    await asyncio.sleep(1.0)
    assert len(accepted(await received(receiver.url))) == 1
    assert again.meter.alerter.sent == {"team-daily": 1}
    await again.stop()
    con = DuckDBStore(ledger)
    con.open()
    try:
        [row] = claims(con)
        assert row["sent_at"] is not None and row["threshold"] == 1.0
    finally:
        con.close()


async def test_a_hanging_webhook_delays_neither_requests_nor_stop(upstream, start_meter, receiver: UpstreamProcess, tmp_path: Path) -> None:
    await set_mode(receiver.url, delay=60)  # accepts nothing for a minute
    config = alert_config(tmp_path / "meter.toml", [receiver.url], alert_at="[0.5]", mode="observe")
    meter = await start_meter(upstream.url, config=config)
    client = sdk(meter.url)
    await client.responses.create(model="gpt-4o", input="hi", extra_headers=USAGE)  # crosses 50%
    await wait_for(lambda: _at_least(receiver.url, 1), what="the POST in flight")
    took = []
    for _ in range(20):
        started = time.perf_counter()
        await client.responses.create(model="gpt-4o", input="hi")
        took.append(time.perf_counter() - started)
    assert max(took) < 0.5, f"slowest request {max(took):.3f}s while the webhook hangs"
    meter.meter.alerter.grace = 0.5
    started = time.perf_counter()
    await meter.stop()
    assert time.perf_counter() - started < 5
    store = DuckDBStore(str(meter.ledger_path))
    store.open()
    try:
        [row] = claims(store)
    finally:
        store.close()
    assert row["sent_at"] is None and row["lease_until"] is None  # released: the next start sends it


# --- the config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('webhooks = ["https://ok.example.com/x", "ftp://files.example.com/x"]', "config: [alerts] webhooks[1]: expected an http(s) URL with a host, got scheme 'ftp' (the URL is not shown: it may hold a secret)"),
        ('webhooks = ["https://user:hunter2@/x"]', "config: [alerts] webhooks[0]: expected an http(s) URL with a host, got one that cannot be read (the URL is not shown: it may hold a secret)"),
        ('webhooks = ["https:///services/T000/B000/SECRET"]', "config: [alerts] webhooks[0]: expected an http(s) URL with a host, got no host (the URL is not shown: it may hold a secret)"),
        ('webhooks = ["https://ok.example.com", 3]', "config: [alerts] webhooks[1]: Input should be a valid string"),
        ('webhook = ["https://ok.example.com"]', "config: [alerts] webhook: Extra inputs are not permitted"),
    ],
)
def test_a_bad_webhook_is_refused_with_one_line_naming_it(tmp_path: Path, table: str, says: str) -> None:
    path = tmp_path / "meter.toml"
    path.write_text(f"[alerts]\n{table}\n")
    with pytest.raises(SettingError) as refused:
        load_settings({"config": str(path)}, env={})
    assert str(refused.value) == says


def test_a_bad_webhook_exits_2_from_the_real_command(tmp_path: Path) -> None:
    # A Slack webhook without its scheme: the path is the secret, and stderr goes to the logs.
    path = tmp_path / "meter.toml"
    path.write_text('[alerts]\nwebhooks = ["hooks.slack.com/services/T000/B000/XXXXSECRET"]\n')
    done = subprocess.run([sys.executable, "-m", "meter", "serve", "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "meter: error: config: [alerts] webhooks[0]: expected an http(s) URL with a host, got no scheme (the URL is not shown: it may hold a secret)"
    ]
    assert "SECRET" not in done.stderr
    assert load_settings({}, env={}).alerts.webhooks == ()
