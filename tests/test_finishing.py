"""Finished flows are recorded together at the end of the loop's turn (meter/finishing.py).

Their records are built and heard by the addons after the handlers that finished
them, in order, before anything else runs on the loop; one flow's failure costs
the others nothing; a stopping meter drains what is queued before the ledger
closes, so no row is lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from meter.finishing import FinishedFlows
from meter.flow import Addons, Flow
from meter.identity import KeyIdentities
from meter.observe import MeteringBudget, observer_for
from meter.record import Record

from .conftest import SECRET_KEY, ledger_rows


class Heard:
    """An addon that notes the path of every record it hears."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.paths: list[str] = []
        self.fail_on = fail_on

    def done(self, flow: Any, record: Record) -> None:
        if record.path == self.fail_on:
            raise RuntimeError("this addon breaks on one record")
        self.paths.append(record.path)


def flow(path: str) -> Flow:
    return Flow(method="POST", path=path, endpoint="responses", headers=CIMultiDictProxy(CIMultiDict()))


async def test_flows_finished_in_one_turn_are_recorded_together_at_its_end_in_order() -> None:
    heard = Heard()
    finished = FinishedFlows(Addons([heard]), KeyIdentities())
    for i in range(5):
        finished.add(flow(f"/v1/responses/{i}"))
    assert heard.paths == [] and len(finished) == 5  # still in the handlers' turn
    await asyncio.sleep(0)  # the loop's next turn
    assert heard.paths == [f"/v1/responses/{i}" for i in range(5)]
    assert len(finished) == 0
    finished.add(flow("/v1/responses/later"))
    finished.drain()  # shutting down: at once
    assert heard.paths[-1] == "/v1/responses/later"
    await asyncio.sleep(0)
    assert len(heard.paths) == 6  # the scheduled drain found nothing left to do twice


async def test_a_read_through_answer_is_observed_with_its_record_and_frees_its_budget() -> None:
    heard = Heard()
    finished = FinishedFlows(Addons([heard]), KeyIdentities())
    budget = MeteringBudget(1 << 20)
    observer = observer_for("responses", "application/json", "", budget=budget)
    answer = b'{"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o", "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}}'
    observer.feed(answer)
    assert budget.free < 1 << 20  # the copy is held until it is read
    one = flow("/v1/responses")
    finished.add(one, observer)
    assert one.observation is None
    await asyncio.sleep(0)
    assert one.observation is not None and one.observation.response_id == "resp_1"
    assert budget.free == 1 << 20
    assert heard.paths == ["/v1/responses"]


async def test_a_failing_addon_costs_the_other_flows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    breaking, after = Heard(fail_on="/v1/responses/1"), Heard()
    finished = FinishedFlows(Addons([breaking, after]), KeyIdentities())
    with caplog.at_level(logging.ERROR, logger="meter"):
        for i in range(3):
            finished.add(flow(f"/v1/responses/{i}"))
        await asyncio.sleep(0)
    assert breaking.paths == ["/v1/responses/0", "/v1/responses/2"]
    assert after.paths == [f"/v1/responses/{i}" for i in range(3)]
    assert "addon done hook failed" in caplog.text


async def test_concurrent_requests_each_get_one_row_even_when_meter_stops_right_after(upstream, start_meter) -> None:
    heard = Heard()
    meter = await start_meter(upstream.url, extra_addons=[heard])
    body = b'{"model": "gpt-4o", "input": "hi"}'
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:

        async def call() -> int:
            async with http.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(call() for _ in range(64)))
        # A scrape right after the answers already counts every one of them.
        async with http.get(meter.admin_url + "/metrics") as r:
            text = await r.text()
    assert statuses == [200] * 64
    assert len(heard.paths) == 64
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("meter_requests_total{"))
    assert counted == 64
    await meter.stop()  # no flush first: stopping drains and writes what is queued
    assert len(ledger_rows(meter.ledger_path)) == 64


class Kept:
    """An addon that keeps every record it hears."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def done(self, flow: Any, record: Record) -> None:
        self.records.append(record)


async def test_a_streamed_call_answered_as_plain_text_is_completed_and_flagged_unmetered() -> None:
    """Relayed whole, it is `completed` (not an `error` for a stream without its
    terminal event), and says why it has no usage."""
    kept = Kept()
    finished = FinishedFlows(Addons([kept]), KeyIdentities())
    observer = observer_for("responses", "text/plain; charset=utf-8", "")
    observer.feed(b"data: not what meter reads\n\n")
    one = flow("/v1/responses")
    one.request_body = b'{"model": "gpt-4o", "input": "hi", "stream": true}'
    one.status_code = 200
    finished.add(one, observer)
    await asyncio.sleep(0)
    [record] = kept.records
    assert (record.outcome, record.error_type, record.error_code, record.stream) == ("completed", "unmetered", "unknown_content_type", True)
