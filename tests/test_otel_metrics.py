"""GenAI client metrics exported over real OTLP/HTTP to a real receiver (SPEC §10, "Exports").

The `OTEL_*` variables are set before the meter starts, as a deployment would
set them; the official SDK makes JSON, streamed and failing calls against the
fake provider; the receiver decodes the `ExportMetricsServiceRequest` protobufs
the SDK's exporter sends, and the names, units, bucket boundaries, attributes,
counts and sums are checked against the ledger's rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from meter.config import Settings, StartupError
from meter.otel_metrics import OtelMetrics, otel_metrics_from_env

from .conftest import SECRET_KEY
from .otlp_receiver import OTLPReceiver, ReceivedPoint

OTEL_VARS = (
    "OTEL_SDK_DISABLED", "OTEL_METRICS_EXPORTER", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_COMPRESSION",
)
# The GenAI semantic conventions' recommended ExplicitBucketBoundaries.
TOKEN_BOUNDS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
SECONDS_BOUNDS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
TOKENS, DURATION, TTFC = "gen_ai.client.token.usage", "gen_ai.client.operation.duration", "gen_ai.client.operation.time_to_first_chunk"
CUMULATIVE = 2
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
async def receiver(clean_otel_env: pytest.MonkeyPatch) -> AsyncIterator[OTLPReceiver]:
    async with OTLPReceiver() as rcv:
        clean_otel_env.setenv("OTEL_METRICS_EXPORTER", "otlp")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rcv.url)
        clean_otel_env.setenv("OTEL_TRACES_EXPORTER", "none")  # metrics only: the spans have their own tests
        clean_otel_env.setenv("OTEL_SERVICE_NAME", "meter-under-test")
        yield rcv


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0)


def host_port(url: str) -> tuple[str, int]:
    from yarl import URL

    u = URL(url)
    assert u.host is not None and u.port is not None
    return u.host, u.port


def streams(receiver: OTLPReceiver, name: str) -> list[ReceivedPoint]:
    return [p for p in receiver.latest().values() if p.name == name]


def one(points: list[ReceivedPoint], **attrs: Any) -> ReceivedPoint:
    """The one stream whose attributes include `attrs` (dots spelled `__`)."""
    want = {k.replace("__", "."): v for k, v in attrs.items()}
    found = [p for p in points if all(p.attributes.get(k) == v for k, v in want.items())]
    assert len(found) == 1, (want, [p.attributes for p in points])
    return found[0]


def assert_histogram(point: ReceivedPoint, unit: str, bounds: list[float]) -> None:
    assert point.kind == "histogram"
    assert point.unit == unit
    assert point.temporality == CUMULATIVE
    assert point.explicit_bounds == bounds
    assert len(point.bucket_counts) == len(bounds) + 1 and sum(point.bucket_counts) == point.count
    assert point.resource["service.name"] == "meter-under-test"
    assert point.scope == "meter"


async def test_json_streamed_and_failed_calls_export_the_genai_client_metrics(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url)
    assert isinstance(meter.meter.otel_metrics, OtelMetrics)
    client = sdk(meter.url)
    usage_a = {"input_tokens": 1200, "cached_tokens": 400, "output_tokens": 300, "reasoning_tokens": 120}
    usage_b = {"input_tokens": 30, "output_tokens": 7}
    await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-usage": json.dumps(usage_a)})
    await client.responses.create(model="gpt-4o", input="again", extra_headers={"x-fake-usage": json.dumps(usage_b)})
    chunks = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-usage": json.dumps({"input_tokens": 50, "output_tokens": 20}), "x-fake-deltas": "4", "x-fake-chunk-delay-ms": "30"},
    )
    async for _ in chunks:
        pass
    embedding = await client.embeddings.create(model="text-embedding-3-small", input="hi")
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "status:429"})
    with pytest.raises(openai.RateLimitError):  # a model name never served: not admitted as an attribute value
        await client.responses.create(model="never-served-9f", input="hi", extra_headers={"x-fake-scenario": "status:429"})
    async with aiohttp.ClientSession() as s, s.get(meter.url + "/v1/models", headers={"Authorization": f"Bearer {SECRET_KEY}"}) as r:
        await r.read()  # not a GenAI operation: no metric

    rows = await meter.rows()
    await meter.stop()  # stop() collects and exports what the periodic reader had not sent yet
    assert receiver.metric_requests >= 1
    by_endpoint: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_endpoint.setdefault(row["endpoint"], []).append(row)
    responses_ok = [r for r in by_endpoint["responses"] if r["status_code"] == 200]
    [chat] = by_endpoint["chat.completions"]
    [emb] = by_endpoint["embeddings"]
    assert len(responses_ok) == 2 and len({r["model"] for r in responses_ok}) == 1
    served, tier = responses_ok[0]["model"], responses_ok[0]["service_tier"]
    host, port = host_port(upstream.url)
    common = {"gen_ai.provider.name": "openai", "server.address": host, "server.port": port}

    # Token usage: input and output of each call, summed per attribute set; billable input includes cached.
    tokens = streams(receiver, TOKENS)
    chat_input = one(tokens, gen_ai__request__model="gpt-4o", gen_ai__token__type="input")
    assert chat_input.attributes == {
        **common, "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": served,
        "openai.response.service_tier": tier, "gen_ai.token.type": "input",
    }
    assert_histogram(chat_input, "{token}", TOKEN_BOUNDS)
    assert (chat_input.count, chat_input.sum) == (2, 1230)
    assert (chat_input.min, chat_input.max) == (30, 1200)
    chat_output = one(tokens, gen_ai__request__model="gpt-4o", gen_ai__token__type="output")
    assert (chat_output.count, chat_output.sum) == (2, 307)
    streamed_in = one(tokens, gen_ai__request__model="gpt-4o-mini", gen_ai__token__type="input")
    streamed_out = one(tokens, gen_ai__request__model="gpt-4o-mini", gen_ai__token__type="output")
    assert (streamed_in.count, streamed_in.sum, streamed_out.count, streamed_out.sum) == (1, 50, 1, 20)
    assert streamed_in.attributes["gen_ai.response.model"] == chat["model"]
    emb_in = one(tokens, gen_ai__operation__name="embeddings")
    assert emb_in.attributes["gen_ai.token.type"] == "input"  # embeddings report no output tokens: none recorded
    assert (emb_in.count, emb_in.sum) == (1, embedding.usage.prompt_tokens) == (1, emb["input_tokens"])
    assert len(tokens) == 5  # nothing for the failed calls (no usage) or the models list

    # Duration: every model call, error.type on the failed ones.
    durations = streams(receiver, DURATION)
    ok = one(durations, gen_ai__request__model="gpt-4o", error__type=None)
    assert_histogram(ok, "s", SECONDS_BOUNDS)
    assert ok.attributes == {**common, "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                             "gen_ai.response.model": served, "openai.response.service_tier": tier}
    assert ok.count == 2
    assert ok.sum == pytest.approx(sum(r["duration_ms"] for r in responses_ok) / 1000, rel=1e-6)
    failed = [p for p in durations if "error.type" in p.attributes]
    assert len(failed) == 2 and all(p.count == 1 for p in failed)
    refused = {r["model_requested"]: r for r in by_endpoint["responses"] if r["status_code"] == 429}
    known = one(failed, gen_ai__request__model="gpt-4o")
    assert known.attributes["error.type"] == refused["gpt-4o"]["error_type"] and known.attributes["error.type"]
    unknown = one(failed, gen_ai__request__model="_OTHER")
    assert unknown.attributes["gen_ai.response.model"] == "_OTHER"
    assert "never-served-9f" not in json.dumps([p.attributes for p in receiver.points])
    assert one(durations, gen_ai__operation__name="embeddings").count == 1
    assert one(durations, gen_ai__request__model="gpt-4o-mini").sum == pytest.approx(chat["duration_ms"] / 1000, rel=1e-6)
    assert len(durations) == 5

    # Time to first chunk: the streamed call only, without the OpenAI tier refinement.
    [ttfc] = streams(receiver, TTFC)
    assert_histogram(ttfc, "s", SECONDS_BOUNDS)
    assert ttfc.attributes == {**common, "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                               "gen_ai.response.model": chat["model"]}
    assert ttfc.count == 1 and ttfc.sum == pytest.approx(chat["ttft_ms"] / 1000, rel=1e-6)
    assert 0 < ttfc.sum < chat["duration_ms"] / 1000

    assert {p.name for p in receiver.points} == {TOKENS, DURATION, TTFC}
    text = json.dumps([(p.attributes, p.resource) for p in receiver.points])
    assert SECRET_KEY not in text and SECRET_KEY[-12:] not in text and "key" not in text

    # Everything exported is in the reference.
    section = docs_section()
    for name in {p.name for p in receiver.points} | {k for p in receiver.points for k in p.attributes}:
        assert f"`{name}`" in section, f"{name} is missing from the OTLP section of docs/metrics.md"


def docs_section() -> str:
    text = (DOCS / "metrics.md").read_text()
    match = re.search(r"^## OTLP metrics\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert match, "docs/metrics.md has no '## OTLP metrics' section"
    return match.group(1)


async def test_export_is_periodic_while_serving(upstream, start_meter, receiver, clean_otel_env) -> None:
    clean_otel_env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    meter = await start_meter(upstream.url)
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-usage": json.dumps({"input_tokens": 9, "output_tokens": 4})})
    # Arrives while the meter runs: the reader's thread exports, no request waits for it.
    [first, *_] = await receiver.wait_for_points(lambda p: p.name == TOKENS and p.attributes["gen_ai.token.type"] == "output")
    assert first.sum == 4
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-usage": json.dumps({"input_tokens": 1, "output_tokens": 6})})
    await meter.stop()
    latest = one(streams(receiver, TOKENS), gen_ai__token__type="output")
    assert (latest.count, latest.sum) == (2, 10)  # cumulative: the totals so far
    assert latest.request > first.request


async def test_off_unless_asked(clean_otel_env: pytest.MonkeyPatch, upstream, start_meter) -> None:
    settings = Settings()
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert otel_metrics_from_env(settings) is None  # an endpoint alone asks for traces, not metrics
    for value in ("none", "prometheus", "otlp,none", ""):
        clean_otel_env.setenv("OTEL_METRICS_EXPORTER", value)
        assert otel_metrics_from_env(settings) is None, value
    clean_otel_env.setenv("OTEL_METRICS_EXPORTER", "otlp")
    clean_otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert otel_metrics_from_env(settings) is None
    clean_otel_env.delenv("OTEL_SDK_DISABLED")
    on = otel_metrics_from_env(settings)
    assert isinstance(on, OtelMetrics)
    await on.stop()

    clean_otel_env.delenv("OTEL_METRICS_EXPORTER")
    meter = await start_meter(upstream.url)
    assert meter.meter.otel_metrics is None
    assert meter.meter.addons is not None
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi")
    [row] = await meter.rows()
    assert row["input_tokens"] is not None  # served and recorded as usual


async def test_websocket_responses_count_as_streamed_calls(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url)
    async with sdk(meter.url).responses.connect() as conn:
        for usage in ({"input_tokens": 11, "output_tokens": 5}, {"input_tokens": 13, "output_tokens": 8}):
            # The fake reads `fake_usage` as an object; the API's metadata values are strings.
            await conn.response.create(model="gpt-4o", input="hi", metadata={"fake_usage": usage})  # type: ignore[dict-item]
            async for event in conn:
                if event.type in ("response.completed", "response.failed", "response.incomplete"):
                    break
    rows = await meter.rows()
    await meter.stop()
    assert [r["transport"] for r in rows] == ["websocket", "websocket"]
    tokens = streams(receiver, TOKENS)
    assert (one(tokens, gen_ai__token__type="input").sum, one(tokens, gen_ai__token__type="output").sum) == (24, 13)
    [duration] = streams(receiver, DURATION)
    assert duration.count == 2 and "error.type" not in duration.attributes  # the 101 of the socket is not an error
    [ttfc] = streams(receiver, TTFC)
    assert ttfc.count == 2 and ttfc.sum == pytest.approx(sum(r["ttft_ms"] for r in rows) / 1000, rel=1e-6)
    assert ttfc.attributes["gen_ai.response.model"] == rows[0]["model"]  # admitted: the upstream created the response


async def test_delta_temporality_exports_each_period_once(upstream, start_meter, receiver, clean_otel_env) -> None:
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    clean_otel_env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "150")
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-usage": json.dumps({"input_tokens": 9, "output_tokens": 4})})
    [first] = await receiver.wait_for_points(lambda p: p.name == TOKENS and p.attributes["gen_ai.token.type"] == "output")
    await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-usage": json.dumps({"input_tokens": 1, "output_tokens": 6})})
    await meter.stop()
    outputs = [p for p in receiver.points if p.name == TOKENS and p.attributes["gen_ai.token.type"] == "output"]
    assert all(p.temporality == 1 for p in receiver.points)  # DELTA
    assert [(p.count, p.sum) for p in outputs] == [(1, 4), (1, 6)]  # each call in one period only; idle periods send nothing
    assert first.request < outputs[1].request


@pytest.mark.parametrize(
    ("name", "value"),
    [("OTEL_METRIC_EXPORT_INTERVAL", "soon"), ("OTEL_METRIC_EXPORT_TIMEOUT", "-5"), ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "sometimes")],
)
async def test_a_bad_variable_stops_start_up_naming_it(upstream, start_meter, receiver, clean_otel_env, name: str, value: str) -> None:
    clean_otel_env.setenv(name, value)
    with pytest.raises(StartupError, match=f"^{name}: .*{value}"):
        await start_meter(upstream.url)


async def test_background_usage_counts_once_on_the_retrieval_that_shows_it(upstream, start_meter, receiver) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    usage = {"input_tokens": 70, "output_tokens": 30}
    created = await client.responses.create(
        model="gpt-4o", input="bg", background=True, extra_headers={"x-fake-usage": json.dumps(usage), "x-fake-polls": "1"}
    )
    statuses = [(await client.responses.retrieve(created.id)).status for _ in range(3)]  # in progress, then done twice
    assert statuses == ["in_progress", "completed", "completed"]
    rows = await meter.rows()
    await meter.stop()
    assert [r["input_tokens"] for r in rows] == [None, None, 70, None]  # the ledger counts it once too
    tokens = streams(receiver, TOKENS)
    assert [(p.attributes["gen_ai.token.type"], p.count, p.sum) for p in sorted(tokens, key=lambda p: p.attributes["gen_ai.token.type"])] == [
        ("input", 1, 70), ("output", 1, 30)
    ]
    assert all(p.attributes["gen_ai.operation.name"] == "chat" for p in tokens)
    [duration] = streams(receiver, DURATION)
    assert duration.count == 1  # the create; a poll's time is not the operation's
