"""meter between the official SDK and a real (fake-provider) upstream process.

Every test compares what arrives through meter with what arrives straight from
the upstream, and each ledger row with the usage the upstream sent.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from typing import Any

import aiohttp
import openai
import pytest
from yarl import URL

from .conftest import SECRET_KEY, clear_upstream_requests, free_port, load_fixture, upstream_requests

USAGE = {"input_tokens": 120, "cached_tokens": 40, "cache_write_tokens": 16, "output_tokens": 30, "reasoning_tokens": 12}


def usage_header(**overrides: int) -> dict[str, str]:
    return {"x-fake-usage": json.dumps({**USAGE, **overrides})}


def sdk(base_url: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0, **kw)


def fixture_header(name: str, index: int = 0) -> dict[str, str]:
    return {"x-fake-fixture": f"{name}#{index}"}


async def test_responses_create_identical_and_metered(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    name = "openai_responses__openai_responses_reasoning_effort.json"
    inter = load_fixture(name)["interactions"][0]
    headers = fixture_header(name)
    through = await sdk(meter.url).responses.create(model="o3-mini", input="hi", extra_headers=headers)
    direct = await sdk(upstream.url).responses.create(model="o3-mini", input="hi", extra_headers=headers)
    assert through.model_dump() == direct.model_dump()
    [row] = await meter.rows()
    expected = inter["expected"]
    assert row["endpoint"] == "responses" and row["outcome"] == "completed" and row["status_code"] == 200
    assert row["response_id"] == expected["response_id"] == through.id
    assert row["model"] == expected["model"]
    assert row["input_tokens"] == expected["usage"]["input_tokens"]
    assert row["output_tokens"] == expected["usage"]["output_tokens"]
    assert row["reasoning_tokens"] == expected["usage"]["reasoning_tokens"]
    assert row["total_tokens"] == expected["usage"]["total_tokens"]
    assert row["model_requested"] == "o3-mini"
    assert row["key_hint"] == "sk-..." + SECRET_KEY[-4:]


async def test_responses_stream_identical_and_metered(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {**usage_header(), "x-fake-deltas": "20"}

    async def collect(base: str) -> list[dict[str, Any]]:
        events = []
        async with sdk(base).responses.stream(model="gpt-4o", input="count", extra_headers=headers, service_tier="flex") as stream:
            async for event in stream:
                events.append(event.model_dump())
            final = await stream.get_final_response()
        return events + [final.model_dump()]

    through = await collect(meter.url)
    direct = await collect(upstream.url)

    def strip_ids(events: list[dict[str, Any]]) -> str:
        # The fake mints a fresh response id per request; everything else must match.
        text = json.dumps(events, sort_keys=True)
        for ev in events:
            for key in ("id", "item_id"):
                for container in (ev, ev.get("response") or {}, ev.get("item") or {}):
                    if isinstance(container, dict) and isinstance(container.get(key), str):
                        text = text.replace(container[key], "<id>")
        return text

    assert len(through) == len(direct) and len(through) > 20
    assert strip_ids(through) == strip_ids(direct)
    [row] = await meter.rows()
    final = through[-1]
    assert row["stream"] is True and row["outcome"] == "completed"
    assert row["response_id"] == final["id"]
    assert row["service_tier_requested"] == "flex" and row["service_tier"] == final["service_tier"] == "flex"
    assert (row["input_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (120, 40, 16)
    assert (row["output_tokens"], row["reasoning_tokens"], row["total_tokens"]) == (30, 12, 150)
    assert row["ttfb_ms"] is not None and row["ttft_ms"] is not None and row["duration_ms"] is not None
    assert 0 < row["ttfb_ms"] <= row["ttft_ms"] <= row["duration_ms"]


async def test_recorded_streams_relay_byte_for_byte(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    index = json.loads((upstream_fixture_index()).read_text())
    cases = [i for i in index if i["stream"] and i["status"] == 200 and i.get("input_tokens") is not None][:8]
    assert cases
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for case in cases:
            inter = load_fixture(case["file"])["interactions"][case["interaction"]]
            headers = {**fixture_header(case["file"], case["interaction"]), "x-fake-chunk-bytes": "7", "Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
            bodies = []
            for base in (meter.url, upstream.url):
                method, body = inter["request"]["method"], inter["request"]["body"]
                async with http.request(method, base + inter["request"]["path"], data=body.encode() if body else None, headers=headers) as r:
                    bodies.append((r.status, r.headers.get("Content-Type"), await r.read()))
            assert bodies[0] == bodies[1]
            assert bodies[0][2] == inter["response"]["body"].encode()
    rows = await meter.rows()
    assert len(rows) == len(cases)
    counted: set[str] = set()
    for case, row in zip(cases, rows):
        if row["response_id"] in counted:
            # The same background response seen again (a resumed stream): usage counts once.
            assert row["input_tokens"] is None and row["endpoint"] == "responses.retrieve"
            continue
        counted.add(row["response_id"])
        assert row["input_tokens"] == case["input_tokens"]
        assert row["output_tokens"] == case["output_tokens"]
        assert row["total_tokens"] == case["total_tokens"]
        assert (row["cached_tokens"] or 0) == case["cached_tokens"]
        assert (row["reasoning_tokens"] or 0) == case["reasoning_tokens"]


def upstream_fixture_index():
    from .conftest import FIXTURES

    return FIXTURES / "index.json"


async def test_chat_completions_with_and_without_stream(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {"x-fake-usage": json.dumps({"input_tokens": 21, "cached_tokens": 5, "output_tokens": 9, "reasoning_tokens": 3})}
    client = sdk(meter.url)
    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers)
    direct = await sdk(upstream.url).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers)
    assert plain.usage == direct.usage and plain.choices == direct.choices and plain.model == direct.model
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}, extra_headers=headers
    )
    chunks = [c async for c in stream]
    usage_chunk = chunks[-1]
    assert usage_chunk.usage is not None and usage_chunk.usage.prompt_tokens == 21
    rows = await meter.rows()
    assert [r["endpoint"] for r in rows] == ["chat.completions", "chat.completions"]
    for row in rows:
        assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["reasoning_tokens"], row["total_tokens"]) == (21, 5, 9, 3, 30)
    assert rows[1]["stream"] is True and rows[1]["ttft_ms"] is not None


async def test_chat_stream_without_include_usage_records_null_not_zero(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    stream = await sdk(meter.url).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert [c async for c in stream]
    [row] = await meter.rows()
    assert row["outcome"] == "completed"
    assert row["input_tokens"] is None and row["output_tokens"] is None and row["total_tokens"] is None


async def test_embeddings(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {"x-fake-usage": json.dumps({"input_tokens": 8})}
    through = await sdk(meter.url).embeddings.create(model="text-embedding-3-small", input="hello", extra_headers=headers)
    direct = await sdk(upstream.url).embeddings.create(model="text-embedding-3-small", input="hello", extra_headers=headers)
    assert through.model_dump() == direct.model_dump()
    [row] = await meter.rows()
    assert row["endpoint"] == "embeddings" and row["input_tokens"] == 8 and row["total_tokens"] == 8
    assert row["output_tokens"] is None  # embeddings have no output, not a zero


async def test_stream_is_relayed_as_it_arrives(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    delay_ms, deltas = 300, 8
    headers = {"x-fake-deltas": str(deltas), "x-fake-chunk-delay-ms": str(delay_ms), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        async with http.post(meter.url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "input": "x", "stream": True}), headers=headers) as r:
            first = await r.content.readuntil(b"\n\n")
            t_first = time.monotonic() - t0
            rest = await r.read()
            t_all = time.monotonic() - t0
    assert first.startswith(b"event: response.created")
    assert b"response.completed" in rest
    # The upstream needs about (events x delay) to finish; the first event must be
    # in the client's hands long before the last one was sent.
    assert t_all > 2.0
    assert t_first < t_all - 1.5


async def test_headers_forwarded_except_hop_by_hop_and_body_byte_for_byte(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await clear_upstream_requests(upstream.url)
    body = b'{"model": "gpt-4o",   "input": "spacing \\u00e9 kept",\n "metadata": {"a": "b"}}'
    headers = {
        "Authorization": f"Bearer {SECRET_KEY}",
        "Content-Type": "application/json",
        "X-Custom": "one",
        "OpenAI-Project": "proj_123",
        "Connection": "keep-alive, X-Hop-Listed",
        "X-Hop-Listed": "gone",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9v",
        "User-Agent": "my-agent/1.0",
    }
    async with aiohttp.ClientSession() as http:
        target = URL(meter.url + "/v1/responses?x=1&y=%2F", encoded=True)  # sent as written, not requoted
        async with http.post(target, data=body, headers=headers) as r:
            assert r.status == 200
            hop_response = {h.lower() for h in r.headers} & {"keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
            await r.read()
    [seen] = await upstream_requests(upstream.url)
    assert seen["path_qs"] == "/v1/responses?x=1&y=%2F"
    assert base64.b64decode(seen["body_b64"]) == body
    names = {k.lower(): v for k, v in seen["headers"]}
    for gone in ("keep-alive", "te", "proxy-authorization", "x-hop-listed", "connection"):
        assert gone not in names or (gone == "connection" and "x-hop-listed" not in names[gone].lower()), gone
    assert names["x-custom"] == "one" and names["openai-project"] == "proj_123" and names["user-agent"] == "my-agent/1.0"
    assert names["authorization"] == f"Bearer {SECRET_KEY}"
    host = upstream.url.split("//", 1)[1]
    assert names["host"] == host
    assert not hop_response
    [row] = await meter.rows()
    assert row["project"] == "proj_123" and json.loads(row["tags"]) == {"a": "b"}
    assert row["request_bytes"] == len(body)


async def test_gzip_answer_relayed_compressed_and_metered(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {"x-fake-scenario": "gzip", **usage_header(), "Content-Type": "application/json", "Accept-Encoding": "gzip"}
    payload = json.dumps({"model": "gpt-4o", "input": "zip"})
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.post(meter.url + "/v1/responses", data=payload, headers=headers) as r:
        assert r.headers.get("Content-Encoding") == "gzip"
        through = await r.read()
    obj = json.loads(gzip.decompress(through))
    assert obj["usage"]["input_tokens"] == 120
    [row] = await meter.rows()
    assert row["input_tokens"] == 120 and row["output_tokens"] == 30
    assert row["response_bytes"] == len(through)


async def test_upstream_unreachable_is_502(start_meter) -> None:
    meter = await start_meter(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(meter.url).responses.create(model="gpt-4o", input="hi")
    assert info.value.status_code == 502
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "meter_proxy_error" and body["code"] == "upstream_unreachable"
    [row] = await meter.rows()
    assert row["outcome"] == "upstream_unreachable" and row["status_code"] == 502 and row["input_tokens"] is None


async def test_upstream_timeout_is_504(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, upstream_timeout=0.5)
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(meter.url).responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "stall-before-headers"})
    assert info.value.status_code == 504
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "upstream_timeout"
    [row] = await meter.rows()
    assert row["outcome"] == "upstream_timeout" and row["status_code"] == 504


@pytest.mark.parametrize("status,code", [(429, "rate_limit_exceeded"), (500, "server_error"), (400, None)])
async def test_upstream_errors_relayed_exactly(upstream, start_meter, status: int, code: str | None) -> None:
    meter = await start_meter(upstream.url)
    headers = {"x-fake-scenario": f"status:{status}", "Content-Type": "application/json"}
    results = []
    async with aiohttp.ClientSession() as http:
        for base in (meter.url, upstream.url):
            async with http.post(base + "/v1/responses", data=b'{"model":"gpt-4o"}', headers=headers) as r:
                results.append((r.status, await r.read()))
    assert results[0] == results[1]
    sent = json.loads(results[0][1])["error"]
    [row] = await meter.rows()
    assert row["status_code"] == status and row["outcome"] == "error"
    assert row["error_type"] == sent["type"]
    assert row["error_code"] == (str(sent["code"]) if sent.get("code") is not None else None)


async def test_client_hangup_mid_stream_cancels_and_is_recorded(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {"x-fake-deltas": "50", "x-fake-chunk-delay-ms": "100", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        r = await http.post(meter.url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "stream": True}), headers=headers)
        await r.content.readuntil(b"\n\n")
        r.close()  # hang up after the first event
    await asyncio.sleep(0.5)
    [row] = await meter.rows()
    assert row["outcome"] == "client_disconnected"
    assert row["input_tokens"] is None
    # The whole stream takes about five seconds; the row was closed long before.
    assert row["duration_ms"] < 2500
    assert meter.meter.proxy.in_flight == 0


async def test_background_usage_counted_once(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    usage = usage_header(input_tokens=77, output_tokens=11, cached_tokens=0, cache_write_tokens=0, reasoning_tokens=0)
    created = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers={**usage, "x-fake-polls": "2"})
    assert created.status in ("queued", "in_progress")
    statuses = []
    for _ in range(6):  # two polls in progress, then completed four times
        got = await client.responses.retrieve(created.id)
        statuses.append(got.status)
    assert statuses[:2] == ["in_progress", "in_progress"] and statuses[2:] == ["completed"] * 4
    rows = await meter.rows()
    assert [r["endpoint"] for r in rows] == ["responses"] + ["responses.retrieve"] * 6
    assert rows[0]["outcome"] == "in_progress" and rows[0]["background"] is True and rows[0]["input_tokens"] is None
    with_usage = [r for r in rows if r["input_tokens"] is not None]
    assert len(with_usage) == 1
    assert with_usage[0]["input_tokens"] == 77 and with_usage[0]["response_id"] == created.id
    assert sum(r["output_tokens"] or 0 for r in rows) == 11
    assert [r["outcome"] for r in rows[1:]] == ["in_progress", "in_progress"] + ["completed"] * 4


async def test_key_identity_from_each_header(upstream, start_meter) -> None:
    import hashlib

    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as http:
        for header, key in (("Authorization", "Bearer sk-aaa-1111"), ("x-api-key", "sk-bbb-2222"), ("api-key", "azure-ccc-3333")):
            async with http.post(meter.url + "/v1/responses", data=b'{"model":"m"}', headers={header: key, "Content-Type": "application/json"}) as r:
                await r.read()
        async with http.get(meter.url + "/v1/models") as r:
            await r.read()
    rows = await meter.rows()
    raw = ["sk-aaa-1111", "sk-bbb-2222", "azure-ccc-3333"]
    assert [r["key_id"] for r in rows[:3]] == [hashlib.sha256(k.encode()).hexdigest()[:16] for k in raw]
    assert [r["key_hint"] for r in rows[:3]] == ["sk-...1111", "sk-...2222", "sk-...3333"]
    assert rows[3]["key_id"] is None and rows[3]["endpoint"] == "other" and rows[3]["status_code"] == 200


async def test_request_too_large_is_413(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, max_request_bytes=1000)
    async with aiohttp.ClientSession() as http, http.post(meter.url + "/v1/responses", data=b"x" * 5000, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        body = await r.json()
    assert body["error"]["type"] == "meter_proxy_error" and body["error"]["code"] == "request_too_large"
    [row] = await meter.rows()
    assert row["status_code"] == 413 and row["outcome"] == "error"


async def test_upstream_path_prefix(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url + "/prefix")
    await clear_upstream_requests(upstream.url)
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi")
    [seen] = await upstream_requests(upstream.url)
    assert seen["path_qs"] == "/prefix/v1/responses"
    [row] = await meter.rows()
    assert row["path"] == "/v1/responses" and row["endpoint"] == "responses" and row["input_tokens"] is not None
