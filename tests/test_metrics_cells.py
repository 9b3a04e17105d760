"""`Metrics.done` in process: what one record adds to each family, exactly.

The addon keeps plain numbers and writes its updates out by hand (the
histograms' bucket choice, the token types, the cost sum) for speed; these tests
pin what the exposition then says: the cost counter is the exact sum of the
records' `cost_usd` (as the ledger sums it, made a float once), a duration equal
to a bucket's bound falls in that bucket (`le` is inclusive), a token type never
reported has no series while a reported zero has one, negative counts are left
out, the in-flight gauge follows the flow and the unmetered count the record.
"""

from __future__ import annotations

import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from meter.flow import Flow
from meter.metrics import LATENCY_BUCKETS, Metrics
from meter.record import Record

from .test_metrics import Scrape, parse


def metrics() -> Metrics:
    return Metrics(SimpleNamespace(metrics_key_label="on", metrics_max_keys=10), None)


def record(**fields: Any) -> Record:
    now = time.time()
    base: dict[str, Any] = {"id": None, "started_at": now, "finished_at": now, "method": "POST", "path": "/v1/responses", "endpoint": "responses",
                            "status_code": 200, "model": "gpt-4o"}
    return Record(**(base | fields))


def scraped(m: Metrics) -> Scrape:
    return parse(m.render().decode())


def test_cost_is_the_exact_sum_of_the_records_costs() -> None:
    m = metrics()
    costs = [Decimal("0.1")] * 10 + [Decimal("0.000152500")] * 7 + [Decimal("12.345678901")]
    for cost in costs:
        m.done(None, record(input_tokens=1, output_tokens=1, cost_usd=cost))
    m.done(None, record(input_tokens=1, output_tokens=1, cost_usd=Decimal(-1)))  # never counted
    m.done(None, record(model="other-model", input_tokens=1, output_tokens=1))  # usage without a price: unpriced
    got = scraped(m)
    # 0.1 added ten times as floats is 0.9999999999999999; the ledger's sum is 1.
    assert got.value("meter_cost_usd_total", model="gpt-4o") == float(sum(costs, Decimal(0)))
    assert got.value("meter_cost_usd_total", model="gpt-4o") != sum(float(c) for c in costs)
    assert got.by("meter_unpriced_requests_total", "model") == {"other-model": 1}
    assert "other-model" not in got.label_values("meter_cost_usd_total", "model")


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    m = metrics()
    seconds = [0.0, *LATENCY_BUCKETS, 0.0100001, 0.3, 601.0, 7200.0]
    for s in seconds:
        m.done(None, record(duration_ms=s * 1000.0, ttfb_ms=s * 1000.0))
    got = scraped(m)
    for family in ("meter_request_duration_seconds", "meter_upstream_ttfb_seconds"):
        buckets = {labels["le"]: v for labels, v in got.select(family + "_bucket", model="gpt-4o")}
        for bound in LATENCY_BUCKETS:
            le = next(k for k in buckets if k != "+Inf" and float(k) == bound)
            assert buckets[le] == sum(1 for s in seconds if s * 1000.0 / 1000.0 <= bound), (family, bound)
        assert buckets["+Inf"] == len(seconds)
        assert got.value(family + "_count", model="gpt-4o") == len(seconds)
        assert got.value(family + "_sum", model="gpt-4o") == sum(s * 1000.0 / 1000.0 for s in seconds)
    assert got.select("meter_time_to_first_token_seconds_count") == []  # never reported: no series


def test_token_types_appear_when_reported_and_negatives_are_left_out() -> None:
    m = metrics()
    m.done(None, record(input_tokens=25, cached_tokens=0, output_tokens=9, reasoning_tokens=-3, web_search_calls=2))
    m.done(None, record(input_tokens=5, output_tokens=-1))
    got = scraped(m)
    assert got.by("meter_tokens_total", "type") == {"input": 30, "cached": 0, "output": 9}
    assert got.value("meter_web_search_calls_total") == 2
    assert got.value("meter_requests_total", status_code="200", outcome="completed") == 2


def test_in_flight_follows_the_flow_and_unmetered_the_record() -> None:
    m = metrics()
    flows = [Flow(method="POST", path="/v1/responses", endpoint="responses", headers={}) for _ in range(3)]
    for flow in flows:
        m.request(flow)
    assert scraped(m).value("meter_in_flight_requests", endpoint="responses") == 3
    unmetered = record(error_type="unmetered", error_code="metered_bytes_limit")
    m.done(flows[0], unmetered)
    m.done(flows[0], unmetered)  # a second done for one flow lowers nothing more
    # What the observer said is not what counts: the record the report reads is.
    flows[1].observation = SimpleNamespace(unmetered="unknown_content_type")  # type: ignore[assignment]
    m.done(flows[1], record(status_code=400))
    m.done(None, record(error_type="unmetered", error_code="no_include_usage"))  # a WebSocket response's record
    got = scraped(m)
    assert got.value("meter_in_flight_requests", endpoint="responses") == 1
    assert got.by("meter_unmetered_requests_total", "reason") == {"metered_bytes_limit": 2, "no_include_usage": 1}
