"""A background response's usage is credited to the request that created it (SPEC §3, §10, §11).

The POST of a background response answers without usage; its usage lands later
on the row of the `GET /v1/responses/{id}` that shows the terminal response.
That GET carries no body, so the row takes the creating row's attribution: its
session, `tags`, `user_id`, `model_requested` and `project` (its own key stays).
Budgets by tag, user and model, `meter report --where tag:...` and the metrics'
tag labels then count the background spend where the creating request belongs.

Checked end to end with a real `meter serve` and the fake provider; across a
restart (the creator is only in the ledger) and in one batch (the creator is in
the writer's batch, not in memory); and across two replicas on PostgreSQL.
"""

from __future__ import annotations

import asyncio
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

from meter.record import Record

from .conftest import ROOT, ledger_rows
from .test_metrics import scrape
from .test_tags_sessions import a_response_of_a_previous_run, sdk

FOREGROUND = {"input_tokens": 1000, "output_tokens": 500}
BACKGROUND = {"input_tokens": 3000, "output_tokens": 2000}


def usage(u: dict[str, int], polls: int = 1) -> dict[str, str]:
    return {"x-fake-usage": json.dumps(u), "x-fake-polls": str(polls)}


async def create_background(client: openai.AsyncOpenAI, **kw: Any) -> str:
    created = await client.responses.create(
        model="gpt-4o", input="bg", background=True, user="alice", metadata={"team": "a"},
        extra_headers={**usage(BACKGROUND), "Meter-Tag-App": "crm", "OpenAI-Project": "proj_a", **kw.pop("extra_headers", {})}, **kw,
    )
    assert created.status == "queued"
    return created.id


async def poll_to_the_end(client: openai.AsyncOpenAI, rid: str, **kw: Any) -> None:
    """In progress once, then completed (with usage) twice: usage counts on one row."""
    statuses = [(await client.responses.retrieve(rid, **kw)).status for _ in range(3)]
    assert statuses == ["in_progress", "completed", "completed"]


def assert_credited(rows: list[dict[str, Any]], rid: str, session: str | None = None) -> dict[str, Any]:
    """The one row of `rid` that holds its usage is the creator's: tags, user, model asked, project, session."""
    creator = next(r for r in rows if r["response_id"] == rid and r["endpoint"] == "responses")
    [carrier] = [r for r in rows if r["response_id"] == rid and r["input_tokens"] is not None]
    assert carrier["endpoint"] == "responses.retrieve" and carrier["input_tokens"] == BACKGROUND["input_tokens"]
    assert json.loads(carrier["tags"]) == json.loads(creator["tags"]) == {"team": "a", "app": "crm"}
    assert (carrier["user_id"], carrier["model_requested"], carrier["project"]) == ("alice", "gpt-4o", "proj_a")
    assert carrier["model"] != "gpt-4o"  # the served snapshot: what a `model` budget missed before
    assert carrier["session_id"] == creator["session_id"] == (session or rid)
    assert carrier["key_id"] == creator["key_id"] is not None
    return carrier


# --- end to end: meter serve ------------------------------------------------------------


def run_meter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meter", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


async def test_budgets_reports_and_metrics_credit_the_creator_of_a_background_response(upstream, meter_process, tmp_path: Path) -> None:
    config = tmp_path / "meter.toml"
    budgets = [("all", ""), ("team-a", 'match = { "tag:team" = "a" }'), ("alice", 'match = { user = "alice" }'), ("gpt-4o", 'match = { model = "gpt-4o" }')]
    config.write_text("".join(f'[[budgets]]\nname = "{name}"\n{match}\nwindow = "day"\nlimit_usd = 1000\n' for name, match in budgets))
    ledger = tmp_path / "serve.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--config", str(config), "--flush-interval", "0.1", "--metrics-tag-labels", "team")
    client = sdk(meter.url)
    async with aiohttp.ClientSession() as http:

        async def spend() -> dict[str, Decimal]:
            async with http.get(meter.admin_url + "/api/budgets") as r:
                return {b["budget"]: b["spend_usd"] for b in await r.json(loads=lambda s: json.loads(s, parse_float=Decimal))}

        await client.responses.create(model="gpt-4o", input="fg", user="alice", metadata={"team": "a"}, extra_headers=usage(FOREGROUND))
        foreground = (await spend())["all"]
        assert foreground > 0  # this replica's own spend counts at once
        rid = await create_background(client)
        await poll_to_the_end(client, rid)
        # The background usage comes back through the ledger (usage claims decide which row
        # keeps it): every budget's spend is read in one statement, so once "all" has it, all do.
        deadline = time.monotonic() + 15
        while (spent := await spend())["all"] == foreground and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    metrics = await scrape(meter.admin_url)
    meter.stop()

    rows = ledger_rows(ledger)
    assert [(r["endpoint"], r["outcome"]) for r in rows] == [
        ("responses", "completed"), ("responses", "in_progress"),
        ("responses.retrieve", "in_progress"), ("responses.retrieve", "completed"), ("responses.retrieve", "completed"),
    ]
    total = sum(r["cost_usd"] for r in rows if r["cost_usd"] is not None)
    assert rows[0]["cost_usd"] > 0 and rows[3]["cost_usd"] > 0 and total == rows[0]["cost_usd"] + rows[3]["cost_usd"]
    assert spent == {name: total for name, _ in budgets}
    # The metrics' tag label: all the cost under team "a", none untagged.
    cost = metrics.by("meter_cost_usd_total", "tag_team")
    assert cost.get("a") == pytest.approx(float(total)) and not cost.get("")

    report = run_meter("report", "--ledger", str(ledger), "--by", "user,tag:team", "--where", "tag:team=a", "--format", "json")
    assert report.returncode == 0, report.stderr
    [group] = json.loads(report.stdout)
    # Both POSTs and the two retrieves that showed the usage (the poll in progress showed none).
    assert (group["user"], group["tag:team"], group["requests"]) == ("alice", "a", 4)
    assert Decimal(str(group["cost_usd"])) == total
    assert group["input_tokens"] == FOREGROUND["input_tokens"] + BACKGROUND["input_tokens"]
    assert_credited(rows, rid)


# --- restarts, batches, replicas -----------------------------------------------------------


async def test_the_creator_is_found_in_the_ledger_after_a_restart(upstream, start_meter, tmp_path) -> None:
    ledger = str(tmp_path / "restart.duckdb")
    before = await start_meter(upstream.url, ledger=ledger)
    rid = await create_background(sdk(before.url), extra_headers={"Meter-Session": "run-9"})
    await before.stop()
    after = await start_meter(upstream.url, ledger=ledger)
    await poll_to_the_end(sdk(after.url), rid)
    assert_credited(await after.rows(), rid, session="run-9")


async def test_a_creator_in_the_same_batch_is_found_there(upstream, start_meter, tmp_path) -> None:
    """The creating POST follows a chain this process does not know, so the request path
    holds no link for it: the writer finds the creator in the batch it is writing."""
    first_id, after = await a_response_of_a_previous_run(upstream.url, start_meter, str(tmp_path / "batch.duckdb"), "batch-run")
    client = sdk(after.url)
    rid = await create_background(client, previous_response_id=first_id)
    await poll_to_the_end(client, rid)
    assert_credited(await after.rows(), rid, session="batch-run")


async def test_the_creator_is_found_across_replicas_on_postgresql(upstream, start_meter, pg_url) -> None:
    one = await start_meter(upstream.url, ledger=pg_url)
    two = await start_meter(upstream.url, ledger=pg_url)
    rid = await create_background(sdk(one.url), extra_headers={"Meter-Session": "fleet-run"})
    await one.flush()
    await poll_to_the_end(sdk(two.url), rid)
    rows = await two.rows()
    assert_credited(rows, rid, session="fleet-run")
    # The row that keeps the usage is the other replica's: its own key, its own process.
    assert [r["endpoint"] for r in rows] == ["responses", "responses.retrieve", "responses.retrieve", "responses.retrieve"]


async def test_the_retrieves_own_tags_add_to_the_creators_which_win(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    rid = await create_background(client)
    await poll_to_the_end(client, rid, extra_headers={"Meter-Tag-Team": "b", "Meter-Tag-Poller": "cron"})
    rows = await meter.rows()
    carrier = next(r for r in rows if r["input_tokens"] is not None and r["endpoint"] == "responses.retrieve")
    assert json.loads(carrier["tags"]) == {"team": "a", "app": "crm", "poller": "cron"}
    polled = next(r for r in rows if r["endpoint"] == "responses.retrieve" and r["outcome"] == "in_progress")
    assert json.loads(polled["tags"]) == {"team": "b", "poller": "cron"}  # a row without usage keeps its own


# --- the parts ------------------------------------------------------------------------------


def _row(rid: str, endpoint: str = "responses", **kw: Any) -> Record:
    return Record(id=None, started_at=0.0, finished_at=0.0, method="GET" if endpoint != "responses" else "POST", path="/v1/responses",
                  endpoint=endpoint, response_id=rid, session_id=kw.pop("session_id", rid), **kw)


def test_resolve_links_takes_the_creator_from_the_batch_then_the_store() -> None:
    from meter.attribution import resolve_links

    in_batch = _row("r1", background=True, tags='{"team":"a"}', user_id="alice", model_requested="gpt-4o", project="p", session_id="S1")
    carrier1 = _row("r1", "responses.retrieve", background=True, input_tokens=1, attribution_of="r1")
    carrier2 = _row("r2", "responses.retrieve", background=True, input_tokens=1, attribution_of="r2", tags='{"x":"y"}', project="own")
    lost = _row("r3", "responses.retrieve", background=True, input_tokens=1, attribution_of="r3")
    # Newest first, as the query orders them: the earliest `responses` row of r2 is its creator.
    stored = [
        ("r2", "responses.retrieve", "r2", None, None, None, None),
        ("r2", "responses", "S2", '{"team": "b"}', "bob", "gpt-4o-mini", None),
    ]
    dropped = resolve_links([in_batch, carrier1, carrier2, lost], stored)
    assert dropped == 0
    assert (carrier1.tags, carrier1.user_id, carrier1.model_requested, carrier1.project, carrier1.session_id) == ('{"team":"a"}', "alice", "gpt-4o", "p", "S1")
    assert json.loads(carrier2.tags) == {"team": "b", "x": "y"} and (carrier2.user_id, carrier2.model_requested, carrier2.project, carrier2.session_id) == (
        "bob", "gpt-4o-mini", "own", "S2")
    assert (lost.tags, lost.user_id, lost.session_id) == (None, None, "r3")  # its creator is nowhere: its own
    assert all(r.attribution_of is None and r.session_of is None for r in (in_batch, carrier1, carrier2, lost))


def test_merged_tags_stay_within_the_bound_and_the_dropped_are_counted() -> None:
    from meter.attribution import Attribution

    creator = {f"m{i}": "v" for i in range(32)}
    own = {f"h{i}": "v" for i in range(3)} | {"m0": "own"}
    record = _row("r", "responses.retrieve", background=True, input_tokens=1, attribution_of="r", tags=json.dumps(own))
    dropped = Attribution("r", json.dumps(creator), None, None, None).lend(record)
    assert dropped == 3 and json.loads(record.tags) == creator


def test_session_chains_lend_a_background_creators_attribution_and_only_that() -> None:
    from meter.attribution import SessionChains

    chains = SessionChains()
    creator = _row("r1", background=True, tags='{"team":"a"}', user_id="alice", model_requested="gpt-4o", project="p", session_id="S")
    chains.done(None, creator)
    poll = _row("r1", "responses.retrieve", background=True)  # no usage: no lookup, its own attribution
    chains.done(None, poll)
    assert (poll.tags, poll.user_id, poll.session_id) == (None, None, "S")
    carrier = _row("r1", "responses.retrieve", background=True, input_tokens=1)
    chains.done(None, carrier)
    assert (carrier.tags, carrier.user_id, carrier.model_requested, carrier.project, carrier.session_id, carrier.attribution_of) == (
        '{"team":"a"}', "alice", "gpt-4o", "p", "S", None)
    # A foreground creator lends nothing: its retrieves carry no usage (SPEC §3).
    chains.done(None, _row("r2", tags='{"team":"a"}'))
    unknown = _row("r2", "responses.retrieve", background=True, input_tokens=1)
    chains.done(None, unknown)
    assert unknown.attribution_of == "r2" and unknown.tags is None  # left to the ledger writer


def test_session_chains_with_attributions_hold_at_most_their_bytes_in_memory() -> None:
    """Background creators at their longest: the byte bound still bounds the memory held."""
    import tracemalloc

    from meter.attribution import SessionChains

    chains = SessionChains()
    tags = json.dumps({f"k{i:062d}": "v" * 512 for i in range(16)} | {f"h{i:062d}": "v" * 256 for i in range(16)})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2_000):  # past the bound
            rid = f"resp_{i:0251x}"
            chains.done(None, _row(rid, background=True, tags=tags[:-1] + f', "n": "{i}"}}', user_id="u" * 256, model_requested="m" * 256,
                                   project="p" * 256, session_id="s" * 250 + f"{i:06x}"))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 100 < len(chains) < 2_000
    assert held <= 8 << 20, f"{held / 2**20:.2f} MiB"


def test_a_spooled_record_keeps_its_unsettled_creator() -> None:
    """A retrieve spooled during an outage is still credited to its creator when replayed."""
    from meter.ledger.spool import record_from_json, record_to_json

    back = record_from_json(record_to_json(_row("r1", "responses.retrieve", background=True, input_tokens=1, attribution_of="r1")))
    assert (back.attribution_of, back.response_id, back.input_tokens) == ("r1", "r1", 1)
    assert "attribution_of" not in record_to_json(_row("r2"))
