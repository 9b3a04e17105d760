"""Budgets across replicas (SPEC §11): two meters on one real PostgreSQL ledger under
32 concurrent clients against a small budget.

What is checked, and what README.md's "Budgets across replicas" states from it:

- no refusal while the ledger's spend was under the limit (no reservations);
- a replica admits nothing matching later than two flush intervals (plus the
  time to write and read a batch) after the spend crossed the limit;
- the overshoot (spend past the limit) is measured and held to the bound that
  follows: what was in flight when spend crossed, plus what the replicas
  admitted before they learned of it;
- afterwards each replica's known spend is exactly the ledger's sum: no row
  counted twice, none missed.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import SECRET_KEY
from .pg import pg_url, postgres  # noqa: F401

CLIENTS = 32
LIMIT = Decimal(3)
FLUSH = 0.5  # the default flush interval
DELAY_MS = 20  # the fake provider's time to answer
USAGE = {"input_tokens": 1000, "output_tokens": 500}  # gpt-4o: $0.0075 a request
SLACK = 0.3  # a batch's write and the spend query, on a loaded 2-core machine


async def test_two_replicas_hold_a_small_budget_under_32_clients(upstream, pg_url, start_meter, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "meter.toml"
    config.write_text(f'[[budgets]]\nname = "small"\nwindow = "day"\nlimit_usd = {LIMIT}\nmode = "enforce"\n')
    replicas = [
        await start_meter(upstream.url, ledger=pg_url, config=str(config), flush_interval=FLUSH, spool=str(tmp_path / f"spool{i}.jsonl"))
        for i in range(2)
    ]
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {SECRET_KEY}",
        "x-fake-usage": json.dumps(USAGE),
        "x-fake-delay-ms": str(DELAY_MS),
    }
    body = json.dumps({"model": "gpt-4o", "input": "hi"})
    refused = [0, 0]
    first_refusal: list[float] = []
    stop_at = time.monotonic() + 30

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < stop_at:
            which = (i + n) % 2  # each client alternates between the replicas
            n += 1
            async with http.post(replicas[which].url + "/v1/responses", data=body, headers=headers) as r:
                await r.read()
                if r.status == 429:
                    refused[which] += 1
                    if not first_refusal:
                        first_refusal.append(time.monotonic())
                else:
                    assert r.status == 200
            if first_refusal and time.monotonic() > first_refusal[0] + 4 * FLUSH + 1:
                return  # both replicas have had time to learn, and to show they hold

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as http:
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
    assert refused[0] > 0 and refused[1] > 0, refused

    rows = await replicas[0].rows()
    completed = [r for r in rows if r["outcome"] == "completed"]
    rejected = [r for r in rows if r["outcome"] == "rejected"]
    assert len(completed) + len(rejected) == len(rows)
    cost = completed[0]["cost_usd"]
    assert all(r["cost_usd"] == cost for r in completed)
    total = sum((r["cost_usd"] for r in completed), Decimal(0))

    # When did the ledger's spend reach the limit?  Rows count once they finish.
    spent = Decimal(0)
    crossed_at = None
    for r in sorted(completed, key=lambda r: r["finished_at"]):
        spent += r["cost_usd"]
        if spent >= LIMIT:
            crossed_at = r["finished_at"]
            break
    assert crossed_at is not None

    # Never a refusal while spend was under the limit.
    for r in rejected:
        before = sum((c["cost_usd"] for c in completed if c["finished_at"] <= r["finished_at"]), Decimal(0))
        assert before >= LIMIT, (r["finished_at"], before)

    # Nothing admitted later than two flush intervals after the crossing (the replica that
    # crossed stops at once; the other learns through the ledger).
    late = [(r["started_at"] - crossed_at).total_seconds() for r in completed if r["started_at"] > crossed_at]
    last_admitted = max(late, default=0.0)
    assert last_admitted <= 2 * FLUSH + SLACK, last_admitted

    # The overshoot and its bound: in flight when spend crossed (every client: CLIENTS
    # requests), plus what was admitted after it, which the check above limits in time.
    overshoot = total - LIMIT
    admitted_after = len(late)
    in_flight_at_crossing = sum(1 for r in completed if r["started_at"] <= crossed_at < r["finished_at"])
    assert in_flight_at_crossing <= CLIENTS
    assert overshoot <= (in_flight_at_crossing + admitted_after) * cost
    rate = len([r for r in completed if r["started_at"] <= crossed_at]) / max(
        1e-3, (crossed_at - min(r["started_at"] for r in completed)).total_seconds()
    )
    print(
        f"\nbudget ${LIMIT}, ${cost} a request, {CLIENTS} clients over 2 replicas, flush interval {FLUSH}s: "
        f"spent ${total} (overshoot ${overshoot}, {overshoot / LIMIT:.0%} of the limit, {overshoot / cost:.0f} requests); "
        f"{in_flight_at_crossing} in flight at the crossing, {admitted_after} admitted after it, the last {last_admitted:.3f}s after; "
        f"{rate:.0f} requests/s before it; refused {refused}"
    )

    # Exact afterwards: each replica's spend is the ledger's, counted once.
    for replica in replicas:  # the sync reads again at its next interval
        deadline = time.monotonic() + 5
        while replica.meter.budgets.states[0].spend != total and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert replica.meter.budgets.states[0].spend == total
        assert replica.meter.budgets.blocked


async def test_a_replica_learns_the_others_spend_within_two_flush_intervals(upstream, pg_url, start_meter, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "meter.toml"
    config.write_text('[[budgets]]\nname = "tiny"\nwindow = "month"\nlimit_usd = 0.001\nmode = "enforce"\n')
    a, b = [
        await start_meter(upstream.url, ledger=pg_url, config=str(config), flush_interval=FLUSH, spool=str(tmp_path / f"s{i}.jsonl"))
        for i in range(2)
    ]
    headers: dict[str, Any] = {"Authorization": f"Bearer {SECRET_KEY}", "x-fake-usage": json.dumps(USAGE), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(a.url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "input": "x"}), headers=headers) as r:
            assert r.status == 200
        done = time.monotonic()
        assert a.meter.budgets.blocked  # its own record: at once
        while not b.meter.budgets.blocked:
            assert time.monotonic() - done <= 2 * FLUSH + SLACK, "b did not learn within two flush intervals"
            await asyncio.sleep(0.01)
        async with http.post(b.url + "/v1/responses", data="{}", headers=headers) as r:
            assert r.status == 429 and r.headers["Meter-Budget"] == "tiny"


async def test_a_ledger_outage_keeps_the_last_figures_and_forwarding_goes_on(upstream, postgres, start_meter, tmp_path: Path) -> None:  # noqa: F811
    url = postgres.new_database()
    config = tmp_path / "meter.toml"
    config.write_text('[[budgets]]\nname = "o"\nwindow = "month"\nlimit_usd = 0.02\nmode = "enforce"\n')
    meter = await start_meter(upstream.url, ledger=url, config=str(config), flush_interval=0.2, spool=str(tmp_path / "spool.jsonl"))
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "x-fake-usage": json.dumps(USAGE), "Content-Type": "application/json"}
    body = json.dumps({"model": "gpt-4o", "input": "x"})
    state = meter.meter.budgets.states[0]
    async with aiohttp.ClientSession() as http:
        async with http.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
            assert r.status == 200
        postgres.stop()
        try:
            # The ledger is gone: requests are forwarded, this replica still counts its own.
            for _ in range(2):
                async with http.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
                    assert r.status == 200
            await asyncio.sleep(1.0)  # reads fail meanwhile; the figures stand
            assert state.spend == 3 * Decimal("0.0075") and meter.meter.budgets.blocked
            async with http.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
                assert r.status == 429
        finally:
            postgres.start()
        rows = await meter.rows()
    assert [r["outcome"] for r in rows] == ["completed", "completed", "completed", "rejected"]
    assert state.spend == sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0))
