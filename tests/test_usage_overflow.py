"""Numbers too big for the ledger (SPEC §2b, §3, §11): one rule for every sink.

A count the ledger's BIGINT cannot hold, or that is no integer at all (a float:
1e30, 1.5, or an integer orjson reads as one past 64 bits), and a cost past
DECIMAL(18,9), are NULL on the record from the moment it is built and priced,
an `overflow` usage anomaly, and leave the row unpriced: the ledger, the metrics
and the budgets see the same record, so they agree, and no lower price is made
from the counts that remain.
"""

from __future__ import annotations

import json
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meter.config import PriceOverride
from meter.flow import Flow, build_record
from meter.identity import KeyIdentities
from meter.ledger import DuckDBStore
from meter.observe import observe_json_body
from meter.observe.sse import SSEObserver
from meter.prices import Pricer
from meter.record import Record
from meter.report.reprice import Repricer, reprice

from .conftest import SECRET_KEY, ledger_rows

BIG = 2**64  # orjson reads it as a float
PAST_BIGINT = 2**63  # orjson reads it as an int; BIGINT holds at most 2**63 - 1


def responses_body(usage: dict[str, Any], **extra: Any) -> bytes:
    # `json`, not orjson: it writes integers of any size, as an upstream may.
    return json.dumps({"object": "response", "id": "resp_1", "model": "gpt-4o", "status": "completed", "usage": usage, **extra}).encode()


def record_of(kind: str, body: bytes, endpoint: str = "responses") -> Record:
    """The priced record of a non-streamed answer, as `meter serve` makes it."""
    flow = Flow(method="POST", path="/v1/responses", endpoint=endpoint, headers={})
    flow.status_code, flow.request_body = 200, b'{"model":"gpt-4o"}'
    flow.observation = observe_json_body(kind, body)
    record = build_record(flow, KeyIdentities())
    Pricer().price_record(record)
    return record


def assert_overflow(record: Record, column: str) -> None:
    assert getattr(record, column) is None
    assert "overflow" in record.anomalies
    assert record.cost_usd is None and not record.priced
    assert (record.error_type, record.error_code) == ("usage_overflow", column)


# --- counts: read, bounded and flagged when the record is built ---------------------------------


def test_input_tokens_past_64_bits_are_not_priced_as_zero() -> None:
    record = record_of("responses", responses_body({"input_tokens": BIG, "output_tokens": 10, "total_tokens": BIG + 10}))
    assert_overflow(record, "input_tokens")
    assert record.output_tokens == 10 and record.total_tokens is None


def test_every_count_that_does_not_fit_or_is_no_integer_is_an_overflow() -> None:
    fine = {"input_tokens": 100, "output_tokens": 10, "total_tokens": 110}
    for value in (BIG, PAST_BIGINT, -(2**70), 10**30, 1e30, 1.5, 100.0, float(2**63)):
        for column, usage in (
            ("input_tokens", {**fine, "input_tokens": value}),
            ("output_tokens", {**fine, "output_tokens": value}),
            ("total_tokens", {**fine, "total_tokens": value}),
            ("cached_tokens", {**fine, "input_tokens_details": {"cached_tokens": value}}),
            ("cache_write_tokens", {**fine, "input_tokens_details": {"cache_write_tokens": value}}),
            ("reasoning_tokens", {**fine, "output_tokens_details": {"reasoning_tokens": value}}),
        ):
            assert_overflow(record_of("responses", responses_body(usage)), column)
        searches = responses_body(fine, tool_usage={"web_search": {"num_requests": value}})
        assert_overflow(record_of("responses", searches), "web_search_calls")
        missed = responses_body(fine, prompt_cache_diagnostics={"type": "cache_miss", "reason": "x", "cache_missed_tokens": value})
        assert_overflow(record_of("responses", missed), "cache_missed_tokens")
        chat = json.dumps({"object": "chat.completion", "model": "gpt-4o", "usage": {"prompt_tokens": value, "completion_tokens": 1}}).encode()
        assert_overflow(record_of("chat", chat, endpoint="chat.completions"), "input_tokens")


def test_cached_tokens_past_64_bits_are_not_priced_at_the_input_rate() -> None:
    record = record_of("responses", responses_body({"input_tokens": 100, "input_tokens_details": {"cached_tokens": BIG}, "output_tokens": 10, "total_tokens": 110}))
    assert_overflow(record, "cached_tokens")
    assert record.input_tokens == 100


def test_a_stream_whose_terminal_event_overflows_is_flagged_too() -> None:
    response = {"object": "response", "id": "resp_s", "model": "gpt-4o", "status": "completed",
                "usage": {"input_tokens": 7, "output_tokens": 1e30, "total_tokens": 8}}
    sse = SSEObserver("responses")
    sse.feed(b"event: response.completed\ndata: " + json.dumps({"type": "response.completed", "response": response}).encode() + b"\n\n")
    flow = Flow(method="POST", path="/v1/responses", endpoint="responses", headers={})
    flow.status_code, flow.request_body, flow.observation = 200, b'{"model":"gpt-4o","stream":true}', sse.finish()
    record = build_record(flow, KeyIdentities())
    Pricer().price_record(record)
    assert_overflow(record, "output_tokens")
    assert record.input_tokens == 7


def test_counts_that_fit_are_kept_and_priced() -> None:
    record = record_of("responses", responses_body({"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500},
                                                   tool_usage={"web_search": {"num_requests": 2}}))
    assert (record.input_tokens, record.output_tokens, record.web_search_calls) == (1000, 500, 2)
    assert record.anomalies == () and record.priced and record.cost_usd is not None and record.error_type is None
    edge = record_of("responses", responses_body({"input_tokens": 0, "output_tokens": 0, "total_tokens": 2**63 - 1}))
    assert edge.total_tokens == 2**63 - 1 and "overflow" not in edge.anomalies  # the largest BIGINT fits (its sum does not)


def test_an_upstream_error_keeps_its_error_type_when_a_count_overflows() -> None:
    body = responses_body({"input_tokens": BIG, "output_tokens": 1}, status="failed", error={"type": "server_error", "code": "boom"})
    record = record_of("responses", body)
    assert record.input_tokens is None and "overflow" in record.anomalies and record.cost_usd is None
    assert (record.error_type, record.error_code) == ("server_error", "boom")


# --- costs: bounded where they are made --------------------------------------------------------


def house(input_mtok: str, output_mtok: str) -> Pricer:
    return Pricer(overrides={"house": PriceOverride(input_mtok=Decimal(input_mtok), output_mtok=Decimal(output_mtok))})


def priced(pricer: Pricer, **counts: int) -> Record:
    record = Record(None, time.time(), time.time(), "POST", "/v1/responses", "responses", model="house", **counts)
    pricer.price_record(record)
    return record


def test_a_cost_past_decimal_18_9_is_an_overflow_not_a_value() -> None:
    pricer = house("1", "1")  # $1 per million tokens: 10**15 tokens are $10**9, one nano-dollar too many
    fits = priced(pricer, input_tokens=10**15 - 1, output_tokens=0)
    assert fits.cost_usd == Decimal("999999999.999999") and fits.priced and fits.anomalies == ()
    over = priced(pricer, input_tokens=10**15, output_tokens=0)
    assert_overflow(over, "cost_usd")
    assert over.input_tokens == 10**15  # the counts fit: kept
    assert pricer.cost("house", None, time.time(), 10**15, 0, 0, 0, 0, 0) is None  # what `meter reprice` asks
    # Rates with more decimal places take the exact Decimal path: the same bound.
    fine = house("1.0001", "1")
    assert_overflow(priced(fine, input_tokens=10**15, output_tokens=0), "cost_usd")
    assert priced(fine, input_tokens=10**14, output_tokens=0).cost_usd == Decimal(100010000)


def test_gpt_4o_with_a_quadrillion_tokens_is_unpriced() -> None:
    record = record_of("responses", responses_body({"input_tokens": 10**15, "output_tokens": 10**15, "total_tokens": 2 * 10**15}))
    assert_overflow(record, "cost_usd")


@pytest.mark.parametrize("upstream_error", [None, ("server_error", "overloaded")])
def test_reprice_leaves_an_overflowed_row_unpriced(tmp_path: Path, upstream_error: tuple[str, str] | None) -> None:
    # Never priced from the output alone.  A row that says the upstream's own error keeps
    # it, so nothing stored says its input count overflowed: no input count, no price.
    ledger = tmp_path / "l.duckdb"
    record = record_of("responses", responses_body({"input_tokens": BIG, "output_tokens": 1000, "total_tokens": BIG + 1000}))
    record.id = "00000000-0000-4000-8000-000000000001"
    if upstream_error is not None:
        record.error_type, record.error_code = upstream_error
    store = DuckDBStore(str(ledger))
    store.open()
    try:
        store.write([record])
        tally = reprice(store, None, Repricer(Pricer()))
    finally:
        store.close()
    [row] = ledger_rows(ledger)
    error_type = upstream_error[0] if upstream_error is not None else "usage_overflow"
    assert row["input_tokens"] is None and row["output_tokens"] == 1000 and row["error_type"] == error_type
    assert row["cost_usd"] is None and tally.changed == 0


# --- end to end: the ledger, the metrics and a budget agree ------------------------------------


def post(url: str, usage: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url + "/v1/responses", data=b'{"model":"gpt-4o","input":"x"}', method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}", "x-fake-usage": json.dumps(usage)},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()
        return int(answer.status)


def samples(admin_url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(admin_url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(admin_url: str, name: str, **labels: str) -> float:
    return sum(v for n, l, v in samples(admin_url) if n == name and all(l.get(k) == want for k, want in labels.items()))


def test_serve_ledger_metrics_and_budget_agree_on_numbers_too_big(upstream: Any, meter_process: Any, tmp_path: Path) -> None:
    ledger = tmp_path / "l.duckdb"
    config = tmp_path / "meter.toml"
    config.write_text('[[budgets]]\nname = "all"\nwindow = "month"\nlimit_usd = 100\nmode = "observe"\n')
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--config", str(config), "--flush-interval", "0.05")
    hostile = [
        {"input_tokens": 10**15, "output_tokens": 10**15},  # counts fit, the cost does not
        {"input_tokens": BIG, "output_tokens": 10},
        {"input_tokens": 100, "cached_tokens": BIG, "output_tokens": 10},
        {"input_tokens": 100, "output_tokens": 10, "web_search_calls": BIG},
    ]
    for usage in [*hostile, {"input_tokens": 1000, "output_tokens": 500}]:
        assert post(meter.url, usage) == 200
    deadline = time.monotonic() + 20
    while metric(meter.admin_url, "meter_ledger_written_records_total") < 5:
        assert time.monotonic() < deadline, "the ledger did not write every record"
        time.sleep(0.1)
    cost_metric = metric(meter.admin_url, "meter_cost_usd_total")
    overflows = metric(meter.admin_url, "meter_usage_anomalies_total", kind="overflow")
    with urllib.request.urlopen(meter.admin_url + "/api/budgets", timeout=10) as answer:
        [budget] = json.loads(answer.read())
    meter.stop()
    rows = ledger_rows(ledger)
    assert len(rows) == 5
    unpriced = [r for r in rows if r["cost_usd"] is None]
    assert len(unpriced) == 4 and all(r["error_type"] == "usage_overflow" for r in unpriced)
    assert sorted(r["error_code"] for r in unpriced) == ["cached_tokens", "cost_usd", "input_tokens", "web_search_calls"]
    [ok] = [r for r in rows if r["cost_usd"] is not None]
    ledger_sum = ok["cost_usd"]
    assert ledger_sum == Decimal("0.0075")  # 1000 in and 500 out of gpt-4o, the only priced row
    assert overflows == 4
    assert abs(cost_metric - float(ledger_sum)) < 1e-12
    assert Decimal(str(budget["spend_usd"])) == ledger_sum
    con = duckdb.connect(str(ledger), read_only=True)
    try:
        assert con.execute("SELECT sum(cost_usd) FROM requests").fetchone() == (ledger_sum,)
    finally:
        con.close()
