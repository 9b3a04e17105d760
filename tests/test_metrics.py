"""`/metrics` on the admin port after real traffic through a real meter (SPEC §6).

The upstream is the fake provider process; each test sends usage it chooses
(`x-fake-usage`) and checks that the counters scraped from the admin port equal
exactly what the upstream reported.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families

from meter.identity import key_id

from .conftest import SECRET_KEY, free_port

SPEC_FAMILIES = {
    # exposed sample family -> (type, label names) of SPEC §6
    "meter_requests": ("counter", {"endpoint", "model", "service_tier", "status_code", "outcome", "key"}),
    "meter_tokens": ("counter", {"endpoint", "model", "service_tier", "key", "type"}),
    "meter_web_search_calls": ("counter", {"model", "key"}),
    "meter_prompt_cache_misses": ("counter", {"model", "reason"}),
    "meter_usage_anomalies": ("counter", {"endpoint", "kind"}),
    "meter_websocket_connections": ("gauge", set()),
    "meter_cost_usd": ("counter", {"model", "service_tier", "key"}),
    "meter_request_duration_seconds": ("histogram", {"endpoint", "model", "stream"}),
    "meter_time_to_first_token_seconds": ("histogram", {"endpoint", "model"}),
    "meter_upstream_ttfb_seconds": ("histogram", {"endpoint", "model"}),
    "meter_in_flight_requests": ("gauge", {"endpoint"}),
    "meter_unpriced_requests": ("counter", {"model"}),
    "meter_ledger_pending_records": ("gauge", set()),
    "meter_ledger_spooled_records": ("gauge", set()),
    "meter_ledger_written_records": ("counter", set()),
    "meter_ledger_write_errors": ("counter", set()),
    "meter_ledger_rejected_records": ("counter", set()),
    "meter_ledger_dropped_records": ("counter", set()),
    "meter_unmetered_requests": ("counter", {"endpoint", "reason"}),
    "meter_values_truncated": ("counter", {"field"}),
}
OTHER_KEY = "sk-test-second-key-Zq8Wm3Lp9Xr2Tb7N"
# The fake provider answers with the dated snapshot of a model alias, as OpenAI does.
GPT4O, GPT4O_MINI, GPT5 = "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18", "gpt-5-2025-08-07"


# --- scraping ------------------------------------------------------------------


@dataclass
class Scrape:
    text: str
    types: dict[str, str]  # family -> type
    samples: list[tuple[str, dict[str, str], float]]  # (sample name, labels, value)

    def select(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(l, v) for n, l, v in self.samples if n == name and all(l.get(k) == want for k, want in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return sum(v for _, v in self.select(name, **labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for l, v in self.select(name, **labels):
            out[l.get(label, "")] += v
        return dict(out)

    def label_values(self, name: str, label: str) -> set[str]:
        return {l[label] for l, _ in self.select(name) if label in l}


def parse(text: str) -> Scrape:
    types: dict[str, str] = {}
    samples = []
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.append((s.name, dict(s.labels), s.value))
    return Scrape(text, types, samples)


async def scrape(admin_url: str) -> Scrape:
    async with aiohttp.ClientSession() as s, s.get(admin_url + "/metrics") as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        return parse(await r.text())


# --- traffic -----------------------------------------------------------------------


def sdk(base_url: str, api_key: str = SECRET_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0)


def fake_usage(**usage: int) -> dict[str, str]:
    return {"x-fake-usage": json.dumps(usage)}


@dataclass
class Sent:
    """What the traffic driver asked the upstream to report, summed the way the metrics sum it."""

    tokens: dict[tuple[str, str], int]  # (model, type) -> tokens
    requests: dict[tuple[str, str, str], int]  # (endpoint, status_code, outcome) -> requests
    web_search: dict[str, int]  # model -> calls
    unpriced: dict[str, int]  # model -> requests
    anomalies: dict[str, int]  # kind -> count
    cache_misses: dict[str, int]  # reason -> count
    streams_with_deltas: int
    upstream_answers: int  # requests that got response headers from the upstream
    total: int


U1 = {"input_tokens": 1200, "cached_tokens": 400, "cache_write_tokens": 160, "output_tokens": 300, "reasoning_tokens": 120, "web_search_calls": 2}
U2 = {"input_tokens": 500, "cached_tokens": 100, "output_tokens": 50, "reasoning_tokens": 20}
U3 = {"input_tokens": 80, "cached_tokens": 16, "output_tokens": 12}
U_UNPRICED = {"input_tokens": 33, "output_tokens": 11}
U_ANOMALY = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 99}
CACHE_MISS = {"type": "cache_miss", "reason": "prefix_changed", "cache_missed_tokens": 900}


async def drive_mixed_traffic(meter_url: str) -> Sent:
    """Streaming and not, several models, keys and tiers, cache reads and writes, reasoning,
    web searches, a cache miss, an unpriced model, a usage anomaly, and errors."""
    a = sdk(meter_url)
    b = sdk(meter_url, OTHER_KEY)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    requests: dict[tuple[str, str, str], int] = defaultdict(int)

    def add(model: str, usage: dict[str, int]) -> None:
        for kind in ("input", "cached", "cache_write", "output", "reasoning"):
            if f"{kind}_tokens" in usage:
                tokens[(model, kind)] += usage[f"{kind}_tokens"]

    # Responses, not streamed, flex, web searches, key A.
    await a.responses.create(model="gpt-5", input="hi", service_tier="flex", extra_headers=fake_usage(**U1))
    add(GPT5, U1)
    requests[("responses", "200", "completed")] += 1
    # Responses, streamed, priority, key B, with a prompt-cache miss.
    async with b.responses.stream(
        model="gpt-4o", input="hi", service_tier="priority",
        extra_headers={**fake_usage(**U2), "x-fake-deltas": "5", "x-fake-cache-diagnostics": json.dumps(CACHE_MISS)},
    ) as stream:
        async for _ in stream:
            pass
    add(GPT4O, U2)
    requests[("responses", "200", "completed")] += 1
    # Chat Completions, streamed with usage, another model, key A.
    chunks = await a.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True},
        extra_headers={**fake_usage(**U3), "x-fake-deltas": "3"},
    )
    async for _ in chunks:
        pass
    add(GPT4O_MINI, U3)
    requests[("chat.completions", "200", "completed")] += 1
    # Chat Completions, not streamed, default tier.
    await a.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=fake_usage(**U3))
    add(GPT4O_MINI, U3)
    requests[("chat.completions", "200", "completed")] += 1
    # A model without a price.
    await a.responses.create(model="acme-unpriced-model", input="hi", extra_headers=fake_usage(**U_UNPRICED))
    add("acme-unpriced-model", U_UNPRICED)
    requests[("responses", "200", "completed")] += 1
    # A usage block that breaks total = input + output.
    await a.responses.create(model="gpt-4o", input="hi", extra_headers=fake_usage(**U_ANOMALY))
    add(GPT4O, U_ANOMALY)
    requests[("responses", "200", "completed")] += 1
    # Errors relayed from the upstream.
    for status in (429, 500):
        try:
            await a.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": f"status:{status}"})
        except openai.APIStatusError as exc:
            assert exc.status_code == status
        else:
            raise AssertionError(f"status:{status} did not fail")
        requests[("responses", str(status), "error")] += 1
    # A request without a key, on a path that is not metered.
    async with aiohttp.ClientSession() as s, s.get(meter_url + "/v1/not-a-real-endpoint") as r:
        await r.read()
        status = r.status
    requests[("other", str(status), "error" if status >= 400 else "completed")] += 1
    await a.close()
    await b.close()
    return Sent(
        tokens=dict(tokens),
        requests=dict(requests),
        web_search={GPT5: U1["web_search_calls"]},
        unpriced={"acme-unpriced-model": 1, GPT4O: 1},  # the anomaly is left unpriced too
        anomalies={"total_mismatch": 1},
        cache_misses={"prefix_changed": 1},
        streams_with_deltas=2,
        upstream_answers=sum(requests.values()),
        total=sum(requests.values()),
    )


# --- tests ---------------------------------------------------------------------------


async def test_counters_equal_the_usage_sent(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, keys={key_id(SECRET_KEY): "team-search"}, price_provider="openai")
    sent = await drive_mixed_traffic(meter.url)
    rows = await meter.rows()
    m = await scrape(meter.admin_url)

    # Every SPEC family is there, with its type and exactly its labels.
    for family, (kind, labels) in SPEC_FAMILIES.items():
        assert m.types.get(family) == kind, (family, m.types.get(family))
        for name, l, _ in m.samples:
            if name.startswith(family) and name.removeprefix(family) in ("", "_total", "_bucket", "_count", "_sum"):
                assert set(l) - {"le"} == labels, (name, l)
    assert not [n for n, _, _ in m.samples if n.endswith("_created")]

    assert len(rows) == sent.total
    for (endpoint, status, outcome), n in sent.requests.items():
        assert m.value("meter_requests_total", endpoint=endpoint, status_code=status, outcome=outcome) == n, (endpoint, status, outcome)
    assert m.value("meter_requests_total") == sent.total
    for (model, kind), n in sent.tokens.items():
        assert m.value("meter_tokens_total", model=model, type=kind) == n, (model, kind)
    assert sum(sent.tokens.values()) == m.value("meter_tokens_total")
    assert m.by("meter_web_search_calls_total", "model") == sent.web_search
    assert m.by("meter_unpriced_requests_total", "model") == sent.unpriced
    assert m.by("meter_usage_anomalies_total", "kind") == sent.anomalies
    assert m.select("meter_usage_anomalies_total", kind="total_mismatch")[0][0]["endpoint"] == "responses"
    assert m.by("meter_prompt_cache_misses_total", "reason") == sent.cache_misses
    assert m.select("meter_prompt_cache_misses_total")[0][0]["model"] == GPT4O

    # Keys: the configured name, else the key_id, else "none".
    keys = m.by("meter_requests_total", "key")
    assert keys == {"team-search": sent.total - 2, key_id(OTHER_KEY): 1, "none": 1}, keys
    # Tiers as served.
    assert m.by("meter_tokens_total", "service_tier", type="input", model=GPT5) == {"flex": U1["input_tokens"]}
    assert m.by("meter_tokens_total", "service_tier", type="input", model=GPT4O)["priority"] == U2["input_tokens"]

    # Cost: the sum of the ledger's cost_usd, per model.
    ledger_cost: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        if row["cost_usd"] is not None:
            ledger_cost[row["model"] or row["model_requested"]] += row["cost_usd"]
    assert ledger_cost and all(v > 0 for v in ledger_cost.values())
    metered_cost = m.by("meter_cost_usd_total", "model")
    assert set(metered_cost) == set(ledger_cost)
    for model, cost in ledger_cost.items():
        assert abs(metered_cost[model] - float(cost)) < 1e-9, (model, metered_cost[model], cost)

    # Latency histograms: one observation per request; TTFT per stream with deltas.
    assert m.value("meter_request_duration_seconds_count") == sent.total
    assert m.value("meter_upstream_ttfb_seconds_count") == sent.upstream_answers
    assert m.value("meter_time_to_first_token_seconds_count") == sent.streams_with_deltas
    assert m.by("meter_request_duration_seconds_count", "stream") == {"true": 2, "false": sent.total - 2}
    durations = {row["id"]: row["duration_ms"] for row in rows}
    assert abs(m.value("meter_request_duration_seconds_sum") - sum(durations.values()) / 1000) < 1e-6

    # Gauges: nothing in flight, no WebSocket, the ledger caught up.
    assert m.value("meter_in_flight_requests") == 0
    assert m.select("meter_websocket_connections") == [({}, 0.0)]
    assert m.value("meter_ledger_pending_records") == 0
    assert m.value("meter_ledger_written_records_total") == sent.total
    assert m.value("meter_ledger_write_errors_total") == 0


async def test_metrics_only_on_the_admin_port(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as s, s.get(meter.url + "/metrics") as r:
        body = await r.text()
        status = r.status
    # The proxy port forwards /metrics like any path: the upstream answers, not meter.
    assert status == 404, (status, body[:200])
    assert "# TYPE" not in body and "meter_requests_total" not in body
    [row] = await meter.rows()
    assert row["path"] == "/metrics" and row["endpoint"] == "other"
    m = await scrape(meter.admin_url)
    assert m.value("meter_requests_total", endpoint="other", status_code="404") == 1


async def test_in_flight_rises_during_a_slow_stream_and_falls_after(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {"x-fake-deltas": "8", "x-fake-chunk-delay-ms": "150", "Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}"}
    body = json.dumps({"model": "gpt-4o", "input": "slow", "stream": True})
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
        assert r.status == 200
        await r.content.readany()  # the stream has started
        during = await scrape(meter.admin_url)
        assert during.value("meter_in_flight_requests", endpoint="responses") == 1
        assert during.value("meter_requests_total") == 0  # counted when done, not per chunk
        await r.read()
    await meter.flush()
    after = await scrape(meter.admin_url)
    assert after.value("meter_in_flight_requests", endpoint="responses") == 0
    assert after.value("meter_requests_total", endpoint="responses") == 1
    assert after.value("meter_time_to_first_token_seconds_count") == 1
    assert after.value("meter_request_duration_seconds_sum") >= 8 * 0.15 * 0.9


async def test_in_flight_balanced_on_refused_and_unreachable(upstream, start_meter) -> None:
    # 413: refused before forwarding (the request hook never ran).
    meter = await start_meter(upstream.url, max_request_bytes=1000)
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", data=b"x" * 5000, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        await r.read()
    # 502: the upstream cannot be reached.
    dead = await start_meter(f"http://127.0.0.1:{free_port()}")
    async with aiohttp.ClientSession() as s, s.post(dead.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}) as r:
        assert r.status == 502
        await r.read()
    m413 = await scrape(meter.admin_url)
    assert m413.value("meter_in_flight_requests") == 0
    assert m413.value("meter_requests_total", status_code="413", outcome="error") == 1
    m502 = await scrape(dead.admin_url)
    assert m502.value("meter_in_flight_requests") == 0
    # A model no 2xx answer ever named is not admitted as a label (SPEC §2b): the upstream never saw it.
    assert m502.value("meter_requests_total", status_code="502", outcome="upstream_unreachable", model="other") == 1
    assert m502.value("meter_upstream_ttfb_seconds_count") == 0


async def test_key_label_bounded(upstream, start_meter) -> None:
    max_keys = 10
    meter = await start_meter(upstream.url, metrics_max_keys=max_keys)
    n = 1000
    sem = asyncio.Semaphore(50)
    usage = fake_usage(input_tokens=3, output_tokens=2)

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        async with sem:
            headers = {"Authorization": f"Bearer sk-many-keys-{i:06d}-padding", "Content-Type": "application/json", **usage}
            async with s.post(meter.url + "/v1/responses", data=b'{"model":"gpt-4o","input":"x"}', headers=headers) as r:
                assert r.status == 200
                await r.read()

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, i) for i in range(n)))
    m = await scrape(meter.admin_url)
    assert m.value("meter_requests_total") == n
    for name in ("meter_requests_total", "meter_tokens_total", "meter_cost_usd_total"):
        keys = m.label_values(name, "key")
        assert len(keys) <= max_keys + 1, (name, len(keys))
        assert "other" in keys
    by_key = m.by("meter_requests_total", "key")
    assert by_key["other"] == n - max_keys
    assert all(v == 1 for k, v in by_key.items() if k != "other")
    series = [l for l, _ in m.select("meter_tokens_total")]
    assert len(series) <= (max_keys + 1) * len(m.label_values("meter_tokens_total", "type"))


async def test_key_label_off(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, metrics_key_label="off")
    for api_key in (SECRET_KEY, OTHER_KEY):
        await sdk(meter.url, api_key).responses.create(model="gpt-4o", input="hi", extra_headers=fake_usage(**U2))
    m = await scrape(meter.admin_url)
    for name, labels, _ in m.samples:
        assert "key" not in labels, (name, labels)
    [(labels, value)] = m.select("meter_requests_total")
    assert value == 2 and labels["model"] == GPT4O
    assert m.value("meter_tokens_total", type="input") == 2 * U2["input_tokens"]
    assert m.value("meter_web_search_calls_total") == 0


async def test_secret_key_never_in_metrics(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, metrics_max_keys=1)
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi", extra_headers=fake_usage(**U1))
    await sdk(meter.url, OTHER_KEY).responses.create(model="gpt-4o", input="hi", extra_headers=fake_usage(**U1))
    async with aiohttp.ClientSession() as s:  # the key in other headers meter reads
        for header in ("x-api-key", "api-key"):
            async with s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers={header: SECRET_KEY}) as r:
                await r.read()
    m = await scrape(meter.admin_url)
    for secret in (SECRET_KEY, OTHER_KEY):
        for i in range(len(secret) - 12):
            assert secret[i : i + 12] not in m.text
    assert key_id(SECRET_KEY) in m.label_values("meter_requests_total", "key")
    assert "other" in m.label_values("meter_requests_total", "key")


def test_the_whole_exposition_is_what_prometheus_client_writes() -> None:
    """meter writes /metrics without prometheus-client (meter/metrics.py): every family,
    the ledger's, budgets', alerts', reconciliation's, the process's and the collector's
    included, must be what prometheus-client's `generate_latest` writes of the same
    families, to the byte; and the process and GC families its own collectors', names,
    help, types and labels."""
    import time
    import types

    import prometheus_client
    from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest

    from meter.budgets.alerts import AlertMetrics
    from meter.budgets.metrics import BudgetMetrics
    from meter.budgets.spend import Budgets
    from meter.config import Budget
    from meter.exposition import CONTENT_TYPE
    from meter.metrics import LedgerMetrics, Metrics
    from meter.reconcile.schedule import ReconcileMetrics, ReconcileSchedule, RunSummary
    from meter.record import Record

    m = Metrics(types.SimpleNamespace(metrics_key_label="on", metrics_max_keys=10, metrics_tag_labels=("team",)))
    stats = types.SimpleNamespace(written=7, write_errors=1, rejected=2, dropped=0, overflows={"responses": 2}, truncated={"model": 4})
    m.register(LedgerMetrics(types.SimpleNamespace(pending=3, spooled=1, stats=stats)))
    m.registry.register(BudgetMetrics(Budgets([Budget(name='b"\\x', window="day", limit_usd=1)], {})))
    m.registry.register(AlertMetrics(types.SimpleNamespace(sent={"b": 1}, failures={"b\n2": 3})))
    schedule = ReconcileSchedule(lambda: RunSummary(groups={}, cost_difference_usd=0.0), 3600.0)
    schedule.state.last_run, schedule.state.runs = 1.78e9, 2
    m.registry.register(ReconcileMetrics(schedule))
    now = time.time()
    m.done(None, Record(id=None, started_at=now, finished_at=now, method="POST", path="/v1/responses", endpoint="responses", status_code=200,
                        model="gpt-4o", input_tokens=5_000_000, output_tokens=3, cost_usd=Decimal("0.1"), duration_ms=1.5, tags='{"team":"a\\"b"}'))
    m.websocket_opened()

    def steady(text: str) -> list[str]:
        # The process's CPU, memory and open files, and the collector's counts, move between two reads: their series stay.
        moving = ("process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_virtual_memory_bytes ", "process_open_fds ", "python_gc_")
        return [line.rsplit(" ", 1)[0] if line.startswith(moving) else line for line in text.splitlines()]

    def name_of(line: str) -> str:
        return line.split(" ")[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]

    prometheus_client.disable_created_metrics()
    own = m.render().decode()
    assert steady(own) == steady(generate_latest(m.registry).decode())
    assert CONTENT_TYPE == prometheus_client.CONTENT_TYPE_LATEST
    assert "meter_websocket_connections 1.0\n" in own and 'budget="b\\"\\\\x"' in own and 'budget="b\\n2"' in own
    assert "process_max_fds " in own and 'python_gc_collections_total{generation="2"} ' in own
    # The process and GC families are prometheus-client's collectors' own.
    reference = CollectorRegistry()
    ProcessCollector(registry=reference)
    GCCollector(registry=reference)
    theirs = steady(generate_latest(reference).decode())
    assert [line for line in steady(own) if name_of(line).startswith(("process_", "python_gc_"))] == theirs
