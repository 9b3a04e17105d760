"""Metrics and traces as their consumers read them, after hostile values went through meter.

A client may send JSON strings that are valid JSON but not valid UTF-8 text
(`"\\ud800"`, a lone surrogate) and control characters; an OpenAI-compatible
upstream may echo them back in its 2xx answer.  The ledger stores them as
U+FFFD (SPEC §2b).  Prometheus' scrape, the OTLP span export and the OTLP
metrics export encode every value as UTF-8: one such value must neither break
them for everyone else nor show anything but what the ledger holds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import aiohttp
import pytest
from prometheus_client import generate_latest

from meter.record import Record

from .conftest import SECRET_KEY
from .otlp_receiver import OTLPReceiver
from .test_metrics import scrape

OTEL_VARS = (
    "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER", "OTEL_METRIC_EXPORT_INTERVAL",
)
HEADERS = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
# Raw JSON: a lone surrogate escape and a control character, each inside a model name and a tag.
BAD_MODEL_JSON, BAD_MODEL = r"bad\ud800mo\u0001del", "bad\ufffdmo\ufffddel"
BAD_TAG_JSON, BAD_TAG = r"te\udc80am", "te\ufffdam"


def body(model_json: str, extra: str = "") -> bytes:
    return ('{"model":"' + model_json + '","input":"hi","messages":[{"role":"user","content":"hi"}]' + extra + "}").encode()


@pytest.fixture
async def otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OTLPReceiver]:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    async with OTLPReceiver() as rcv:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rcv.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
        yield rcv


async def post(url: str, data: bytes) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=HEADERS) as r:
        await r.read()
        return r.status


async def test_labels_from_bad_text_keep_the_scrape_working_and_match_the_ledger(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, metrics_tag_labels="team,feature")
    # /v1/responses/input_tokens answers 200 without a model: the label is the requested one.
    tags = ',"metadata":{"team":"' + BAD_TAG_JSON + '","feature":"search"}'
    assert await post(meter.url + "/v1/responses/input_tokens", body(BAD_MODEL_JSON, tags)) == 200
    [row] = await meter.rows()
    assert row["model_requested"] == BAD_MODEL and json.loads(row["tags"]) == {"team": BAD_TAG, "feature": "search"}

    m = await scrape(meter.admin_url)  # a 500 here: the exposition could not be encoded
    [(labels, n)] = m.select("meter_requests_total")
    assert n == 1
    assert labels["model"] == row["model_requested"]
    # One bad tag value loses no other tag: each label is the ledger's value.
    assert (labels["tag_team"], labels["tag_feature"]) == (BAD_TAG, "search")


async def test_span_and_otlp_metrics_of_bad_text_are_exported_as_the_ledger_holds_it(upstream, otlp, start_meter) -> None:
    meter = await start_meter(upstream.url)
    # Chat Completions: the fake provider echoes the model it was asked for, as many compatible servers do.
    assert await post(meter.url + "/v1/chat/completions", body(BAD_MODEL_JSON)) == 200
    assert await post(meter.url + "/v1/chat/completions", body("good-model")) == 200
    rows = {row["model_requested"]: row for row in await meter.rows()}
    assert set(rows) == {BAD_MODEL, "good-model"}

    spans = await otlp.wait_for(lambda s: s.name.startswith("chat "), count=2, timeout=5)
    by_model = {s.attributes["gen_ai.request.model"]: s for s in spans}
    assert set(by_model) == set(rows)
    bad = by_model[BAD_MODEL]
    assert bad.name == f"chat {BAD_MODEL}"
    assert bad.attributes["gen_ai.response.model"] == rows[BAD_MODEL]["model"] == BAD_MODEL
    assert bad.trace_id == rows[BAD_MODEL]["trace_id"]

    deadline = time.monotonic() + 5
    while not {"good-model", BAD_MODEL} <= {
        p.attributes.get("gen_ai.request.model") for p in otlp.latest().values() if p.name == "gen_ai.client.operation.duration"
    }:
        assert time.monotonic() < deadline, "the GenAI client metrics of both calls were never exported"
        await asyncio.sleep(0.05)


# --- a scrape of many series --------------------------------------------------------


def priced_record(model: str, key_id: str) -> Record:
    now = time.time()
    return Record(
        id=None, started_at=now, finished_at=now, method="POST", path="/v1/responses", endpoint="responses", status_code=200,
        outcome="completed", model=model, service_tier="default", key_id=key_id, input_tokens=10, cached_tokens=2, output_tokens=5,
        reasoning_tokens=1, cost_usd=Decimal("0.000125"), duration_ms=420.0, ttfb_ms=80.0, ttft_ms=120.0, stream=True,
    )


async def test_a_scrape_of_many_series_holds_the_proxy_briefly(upstream, start_meter) -> None:
    """/metrics is rendered on the event loop that relays every request: 8,000 label
    combinations (80 models, 100 keys: well within the budgets) must not hold it for the
    time prometheus-client takes to write them (it held it 1.6 s at 30,000)."""
    meter = await start_meter(upstream.url)
    metrics = meter.meter.metrics
    for m in range(80):
        for k in range(100):
            metrics.done(None, priced_record(f"model-{m}", f"{k:016x}"))
    started = time.perf_counter()
    reference = generate_latest(metrics.registry)  # the same families, through prometheus-client
    reference_seconds = time.perf_counter() - started

    longest_gap = 0.0
    scraping = True

    async def ticker() -> None:
        nonlocal longest_gap
        last = time.perf_counter()
        while scraping:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest_gap, last = max(longest_gap, now - last), now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    async with aiohttp.ClientSession() as s, s.get(meter.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    scraping = False
    await ticking
    assert text.count("\nmeter_requests_total{") == 8000
    assert longest_gap < reference_seconds / 2, (longest_gap, reference_seconds)  # ~1/6 measured: room for a loaded machine
    assert meter_families(text) == meter_families(reference.decode())


def meter_families(text: str) -> list[str]:
    """The lines of meter's own families (the process and collector families change between two reads)."""
    return [line for line in text.splitlines() if line.startswith(("meter_", "# HELP meter_", "# TYPE meter_"))]
