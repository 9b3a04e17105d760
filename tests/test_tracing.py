"""Spans exported over real OTLP/HTTP to a real receiver (SPEC §7).

The `OTEL_*` variables are set before the meter starts, exactly as a deployment
would set them; the receiver decodes the protobuf the SDK's exporter sends.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from meter.config import Settings
from meter.tracing import Tracing, tracing_from_env

from .conftest import SECRET_KEY, clear_upstream_requests, upstream_requests
from .otlp_receiver import OTLPReceiver, ReceivedSpan

CLIENT = 3  # Span.SpanKind.SPAN_KIND_CLIENT
STATUS_UNSET, STATUS_ERROR = 0, 2
OTEL_VARS = (
    "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_COMPRESSION",
)
USAGE = {"input_tokens": 1200, "cached_tokens": 400, "cache_write_tokens": 160, "output_tokens": 300, "reasoning_tokens": 120}


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
async def receiver(clean_otel_env: pytest.MonkeyPatch) -> AsyncIterator[OTLPReceiver]:
    async with OTLPReceiver() as rcv:
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rcv.url)
        clean_otel_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        clean_otel_env.setenv("OTEL_SERVICE_NAME", "meter-under-test")
        yield rcv


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0)


def traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def host_port(url: str) -> tuple[str, int]:
    from yarl import URL

    u = URL(url)
    assert u.host is not None and u.port is not None
    return u.host, u.port


def assert_no_secret(spans: list[ReceivedSpan]) -> None:
    for span in spans:
        for where in (span.attributes, span.resource):
            text = json.dumps(where)
            assert SECRET_KEY not in text and SECRET_KEY[-12:] not in text, (span.name, where)


async def test_model_span_continues_the_trace_with_exact_attributes(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url, price_provider="openai")
    assert meter.meter.tracing is not None
    await clear_upstream_requests(upstream.url)
    incoming, trace_id, parent_id = traceparent()
    headers = {"x-fake-usage": json.dumps(USAGE), "traceparent": incoming, "tracestate": "vendor=abc"}
    answer = await sdk(meter.url).responses.create(model="gpt-4o", input="hi", service_tier="priority", extra_headers=headers)

    [span] = await receiver.wait_for(lambda s: s.trace_id == trace_id)
    [row] = await meter.rows()
    host, port = host_port(upstream.url)
    assert span.name == "chat gpt-4o"
    assert span.kind == CLIENT
    assert span.parent_span_id == parent_id
    assert span.trace_state == "vendor=abc"
    assert span.status_code == STATUS_UNSET
    assert span.resource["service.name"] == "meter-under-test"
    assert row["trace_id"] == trace_id
    assert row["cost_usd"] is not None
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "openai.api.type": "responses",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": answer.model,
        "gen_ai.response.id": answer.id,
        "gen_ai.request.stream": False,
        "gen_ai.usage.input_tokens": USAGE["input_tokens"],
        "gen_ai.usage.output_tokens": USAGE["output_tokens"],
        "gen_ai.usage.cache_read.input_tokens": USAGE["cached_tokens"],
        "gen_ai.usage.cache_creation.input_tokens": USAGE["cache_write_tokens"],
        "gen_ai.usage.reasoning.output_tokens": USAGE["reasoning_tokens"],
        "openai.request.service_tier": "priority",
        "openai.response.service_tier": row["service_tier"],
        "server.address": host,
        "server.port": port,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "url.path": "/v1/responses",
        "meter.cost_usd": float(row["cost_usd"]),
    }
    assert span.attributes == expected
    assert answer.usage is not None and answer.usage.input_tokens == USAGE["input_tokens"]
    # The span covers the request: from its arrival to the last byte (the ledger's times).
    assert span.start_time_unix_nano == pytest.approx(row["started_at"].timestamp() * 1e9, abs=2e3)
    assert span.end_time_unix_nano == pytest.approx(row["finished_at"].timestamp() * 1e9, abs=2e3)

    # The upstream saw our span as the parent, not the client's, and the client's tracestate.
    [seen] = [r for r in await upstream_requests(upstream.url) if r["path_qs"] == "/v1/responses"]
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert sent["traceparent"] == f"00-{trace_id}-{span.span_id}-01"
    assert sent["tracestate"] == "vendor=abc"
    assert_no_secret([span])


async def test_stream_span_has_time_to_first_chunk(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url)
    usage = {"input_tokens": 50, "cached_tokens": 10, "output_tokens": 20}
    chunks = await sdk(meter.url).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-usage": json.dumps(usage), "x-fake-deltas": "4", "x-fake-chunk-delay-ms": "30"},
    )
    async for _ in chunks:
        pass
    [span] = await receiver.wait_for(lambda s: s.name == "chat gpt-4o-mini")
    [row] = await meter.rows()
    a = span.attributes
    assert span.parent_span_id == ""  # no traceparent came in: a new trace
    assert span.trace_id == row["trace_id"]
    assert a["openai.api.type"] == "chat_completions"
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.input_tokens"] == 50 and a["gen_ai.usage.output_tokens"] == 20
    assert a["gen_ai.usage.cache_read.input_tokens"] == 10
    assert a["gen_ai.usage.reasoning.output_tokens"] == 0  # reported as 0: a known zero, set
    assert "openai.request.service_tier" not in a  # not asked for: not set
    ttfc = a["gen_ai.response.time_to_first_chunk"]
    assert isinstance(ttfc, float)
    assert ttfc == pytest.approx(row["ttft_ms"] / 1000)
    assert 0 < ttfc < (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9


async def test_plain_http_and_error_spans(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as s, s.get(meter.url + "/v1/models?secret=" + SECRET_KEY, headers={"Authorization": f"Bearer {SECRET_KEY}"}) as r:
        await r.read()
        models_status = r.status
    with pytest.raises(openai.RateLimitError):
        await sdk(meter.url).responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "status:429"})

    [plain] = await receiver.wait_for(lambda s: s.name == "GET other")
    [failed] = await receiver.wait_for(lambda s: s.name == "chat gpt-4o")
    host, port = host_port(upstream.url)
    expected_plain = {
        "server.address": host,
        "server.port": port,
        "http.request.method": "GET",
        "http.response.status_code": models_status,
        "url.path": "/v1/models",
    }
    if models_status >= 400:
        expected_plain["error.type"] = str(models_status)
    assert plain.attributes == expected_plain
    assert not any(k.startswith("gen_ai.") for k in plain.attributes)
    assert failed.status_code == STATUS_ERROR
    assert failed.attributes["http.response.status_code"] == 429
    assert failed.attributes["error.type"]  # the provider's error type, else the status code
    assert "gen_ai.usage.input_tokens" not in failed.attributes
    rows = await meter.rows()
    assert {r["trace_id"] for r in rows} == {plain.trace_id, failed.trace_id}
    assert_no_secret(receiver.spans)


async def test_refused_request_still_gets_a_span(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url, max_request_bytes=1000)
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", data=b"x" * 5000, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    [span] = await receiver.wait_for(lambda s: True)
    [row] = await meter.rows()
    assert span.trace_id == row["trace_id"]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["http.response.status_code"] == 413
    assert span.attributes["error.type"] == "meter_proxy_error"


async def test_traces_off_unless_asked(clean_otel_env: pytest.MonkeyPatch, upstream, start_meter) -> None:
    settings = Settings()
    assert tracing_from_env(settings) is None  # no endpoint
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    clean_otel_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing_from_env(settings) is None
    clean_otel_env.delenv("OTEL_TRACES_EXPORTER")
    clean_otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing_from_env(settings) is None
    clean_otel_env.delenv("OTEL_SDK_DISABLED")
    on = tracing_from_env(settings)
    assert isinstance(on, Tracing)
    await on.stop()
    clean_otel_env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    meter = await start_meter(upstream.url)
    assert meter.meter.tracing is None
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}) as r:
        await r.read()
    [row] = await meter.rows()
    assert row["trace_id"] is None


async def test_sampler_from_env_keeps_propagating(upstream, start_meter, receiver, clean_otel_env) -> None:
    clean_otel_env.setenv("OTEL_TRACES_SAMPLER", "always_off")
    meter = await start_meter(upstream.url)
    await clear_upstream_requests(upstream.url)
    incoming, trace_id, parent_id = traceparent()
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers={"traceparent": incoming}) as r:
        await r.read()
    [row] = await meter.rows()
    assert row["trace_id"] == trace_id  # the trace id is still known and passed on
    [seen] = await upstream_requests(upstream.url)
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert sent["traceparent"].startswith(f"00-{trace_id}-") and sent["traceparent"].endswith("-00")
    assert parent_id not in sent["traceparent"]
    await meter.stop()  # flushes the provider: nothing was sampled, nothing arrives
    assert receiver.spans == []
