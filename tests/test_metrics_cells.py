"""`Metrics.done` in process: what one record adds to each family, exactly.

The addon keeps plain numbers and writes its updates out by hand (the
histograms' bucket choice, the token types, the cost sum) for speed; these tests
pin what the exposition then says: the cost counter is the exact sum of the
records' `cost_usd` (as the ledger sums it, made a float once), a duration equal
to a bucket's bound falls in that bucket (`le` is inclusive), a token type never
reported has no series while a reported zero has one, negative counts are left
out, the in-flight gauge follows the flow and the unmetered count the record,
and the text `render` writes itself is prometheus-client's to the byte.
"""

from __future__ import annotations

import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest

from meter.flow import Flow
from meter.metrics import LATENCY_BUCKETS, LedgerMetrics, Metrics
from meter.record import Record

from .test_metrics import Scrape, parse


def metrics() -> Metrics:
    return Metrics(SimpleNamespace(metrics_key_label="on", metrics_max_keys=10))


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


def test_the_exposition_is_what_prometheus_client_writes_of_the_same_families() -> None:
    """`render` writes the plain-number families itself (for speed); every byte of them must
    be what prometheus-client's own `generate_latest` makes of the registry's families,
    escapes, number formats, sorted labels, `le` places and the ledger's counts included."""
    m = Metrics(SimpleNamespace(metrics_key_label="on", metrics_max_keys=10, metrics_tag_labels=("team", "a-b")))
    ledger = SimpleNamespace(
        pending=3, spooled=0,
        stats=SimpleNamespace(written=7, write_errors=1, rejected=0, overflows={"responses": 2, "embeddings": 0}, truncated={"model": 4, "tags": 0}),
    )
    m.register(LedgerMetrics(ledger))
    m.request(Flow(method="POST", path="/v1/responses", endpoint="responses", headers={}))
    tags = '{"team":"se\\"a\\\\rch","a-b":"é"}'
    m.done(None, record(key_name='na"me\\x', tags=tags, input_tokens=5_000_000, output_tokens=12, cost_usd=Decimal("0.000000001"), duration_ms=0.5))
    m.done(None, record(model="", service_tier="flex", status_code=None, outcome="upstream_unreachable", duration_ms=1e9))
    m.done(None, record(stream=True, ttft_ms=300.0, ttfb_ms=10.0, duration_ms=700.0, anomalies=("total_mismatch",), cache_status="miss:model_changed"))
    m.done(None, record(endpoint="embeddings", input_tokens=3, error_type="unmetered", error_code="no_usage", web_search_calls=1_234_567))
    text = m.render().decode()
    own = [line for line in text.splitlines() if line.startswith(("meter_", "# HELP meter_", "# TYPE meter_"))]
    reference = [line for line in generate_latest(m.registry).decode().splitlines() if line.startswith(("meter_", "# HELP meter_", "# TYPE meter_"))]
    assert own == reference
    assert 'key="na\\"me\\\\x"' in text and 'tag_team="se\\"a\\\\rch"' in text and "5e+06" in text
    assert any(line.startswith("meter_usage_anomalies_total{endpoint=\"responses\",kind=\"overflow\"} 2.0") for line in own)
