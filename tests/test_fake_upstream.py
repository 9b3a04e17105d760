"""Quick checks of the fake provider itself (`tests/fake_upstream.py`), run as its own process.

Sync tests around `asyncio.run`, so they do not depend on the pytest asyncio mode.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import openai
import pytest
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "openai"
JSON = {"Content-Type": "application/json"}
T = TypeVar("T")


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:"), line
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def run(make: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
    async def go() -> T:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            return await make(http)

    return asyncio.run(go())


def sse_payloads(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize(
    "name,index,chunk_bytes",
    [
        ("openai_responses__openai_responses_stream.json", 0, None),
        ("openai_responses__background_mode_streaming_starting_after_vcr.json", 1, "1000"),
        ("openai_responses__openai_responses_compact_messages.json", 2, None),
        ("openai_responses__openai_responses_model_http_error.json", 0, None),
    ],
)
def test_fixture_replay_is_byte_for_byte(fake_url: str, name: str, index: int, chunk_bytes: str | None) -> None:
    inter = fixture(name)["interactions"][index]
    headers = {**JSON, "x-fake-fixture": f"{name}#{index}"}
    if chunk_bytes:
        headers.update({"x-fake-chunk-bytes": chunk_bytes, "x-fake-chunk-delay-ms": "20"})

    async def call(http: aiohttp.ClientSession) -> tuple[int, Any, bytes, list[bytes]]:
        request = inter["request"]
        body = request["body"].encode() if request.get("body") else None
        async with http.request(request["method"], fake_url + request["path"], data=body, headers=headers) as r:
            chunks = [c async for c in r.content.iter_any()]
            return r.status, r.headers.copy(), b"".join(chunks), chunks

    status, got_headers, body, chunks = run(call)
    recorded = inter["response"]
    assert status == recorded["status"] and body == recorded["body"].encode()
    for key, value in recorded["headers"].items():
        assert got_headers[key] == value
    if chunk_bytes:  # re-cut into pieces of that size, sent apart
        assert max(len(c) for c in chunks) <= int(chunk_bytes) and len(chunks) >= len(body) // int(chunk_bytes)


def test_synthetic_stream_ends_with_completed_and_the_forced_usage(fake_url: str) -> None:
    usage = {
        "input_tokens": 120,
        "cached_tokens": 40,
        "cache_write_tokens": 16,
        "output_tokens": 30,
        "reasoning_tokens": 12,
        "web_search_calls": 2,
    }
    headers = {**JSON, "x-fake-usage": json.dumps(usage), "x-fake-deltas": "7", "x-fake-cache-diagnostics": json.dumps({"status": "hit"})}

    async def call(http: aiohttp.ClientSession) -> bytes:
        body = {"model": "gpt-4o", "input": "hi", "stream": True, "service_tier": "fast"}
        async with http.post(fake_url + "/prefix/v1/responses?beta=true", json=body, headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-request-id"].startswith("req_") and int(r.headers["openai-processing-ms"]) > 0
            return await r.read()

    events = sse_payloads(run(call))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 7 and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["usage"] is None and created["service_tier"] == "auto"
    assert final["model"] == "gpt-4o-2024-08-06" and final["service_tier"] == "priority" and final["id"] == created["id"]
    assert final["usage"] == {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 16},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 12},
        "total_tokens": 150,
    }
    assert final["tool_usage"] == {"web_search": {"num_requests": 2}} and final["prompt_cache_diagnostics"] == {"status": "hit"}
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text


def test_the_sdk_reads_every_synthetic_answer(fake_url: str) -> None:
    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=fake_url + "/v1", api_key="sk-test", max_retries=0)
        plain = await client.responses.create(model="gpt-5", input="hi")
        assert plain.status == "completed" and plain.model == "gpt-5-2025-08-07" and plain.usage is not None
        assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
        async with client.responses.stream(model="gpt-4o", input="hi", extra_headers={"x-fake-terminal": "incomplete"}) as stream:
            async for _ in stream:
                pass
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
            )
        ]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and all(c.usage is None for c in chunks[:-1])
        chat = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-usage": '{"input_tokens": 9, "output_tokens": 2}'},
        )
        assert chat.usage is not None and (chat.usage.prompt_tokens, chat.usage.total_tokens) == (9, 11)
        embedded = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 16
        compacted = await client.responses.compact(
            model="gpt-5", input="long", extra_headers={"x-fake-usage": '{"input_tokens": 50, "output_tokens": 20}'}
        )
        assert compacted.usage.total_tokens == 70
        counted = await client.responses.input_tokens.count(model="gpt-4o", input="hello")
        assert counted.input_tokens > 0
        with pytest.raises(openai.RateLimitError) as limited:
            await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "status:429"})
        assert limited.value.code == "rate_limit_exceeded"
        await client.close()

    asyncio.run(go())


def test_background_polling_flips_to_completed_and_resumes(fake_url: str) -> None:
    usage = json.dumps({"input_tokens": 77, "output_tokens": 11})

    async def call(http: aiohttp.ClientSession) -> None:
        body = {"model": "gpt-4o", "input": "bg", "background": True}
        async with http.post(fake_url + "/v1/responses", json=body, headers={"x-fake-usage": usage, "x-fake-polls": "2"}) as r:
            created = await r.json()
        assert created["status"] == "queued" and created["usage"] is None
        seen = []
        for _ in range(4):
            async with http.get(fake_url + f"/v1/responses/{created['id']}") as r:
                got = await r.json()
                seen.append((got["status"], got["usage"] and got["usage"]["input_tokens"]))
        assert seen == [("in_progress", None), ("in_progress", None), ("completed", 77), ("completed", 77)]
        async with http.get(fake_url + f"/v1/responses/{created['id']}?stream=true&starting_after=3") as r:
            resumed = sse_payloads(await r.read())
        assert resumed[0]["sequence_number"] == 4 and resumed[-1]["type"] == "response.completed"
        async with http.post(fake_url + f"/v1/responses/{created['id']}/cancel") as r:
            assert (await r.json())["status"] == "cancelled"
        async with http.delete(fake_url + f"/openai/v1/responses/{created['id']}?api-version=x") as r:
            assert await r.json() == {"id": created["id"], "object": "response.deleted", "deleted": True}

    run(call)


def test_requests_are_recorded_as_received(fake_url: str) -> None:
    body = b'{"model": "gpt-4o",   "input": "spacing kept"}'

    async def call(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.delete(fake_url + "/__fake/requests") as r:
            assert r.status == 200
        target = URL(fake_url + "/v1/responses?x=1&y=%2F", encoded=True)
        async with http.post(target, data=body, headers={**JSON, "X-First": "1", "x-second": "2"}) as r:
            assert r.status == 200
        async with http.post(fake_url + "/v1/responses", data=b'{"model": ', headers=JSON) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["type"] == "invalid_request_error" and error["message"].startswith("We could not parse the JSON body")
        async with http.get(fake_url + "/__fake/requests") as r:
            return await r.json()

    first, second = run(call)
    assert first["method"] == "POST" and first["path_qs"] == "/v1/responses?x=1&y=%2F"
    assert base64.b64decode(first["body_b64"]) == body
    names = [k for k, _ in first["headers"]]
    assert names.index("X-First") < names.index("x-second")
    assert base64.b64decode(second["body_b64"]) == b'{"model": '


def test_faults(fake_url: str) -> None:
    async def call(http: aiohttp.ClientSession) -> None:
        stream = {"model": "gpt-4o", "stream": True}
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(fake_url + "/v1/responses", json=stream, headers={"x-fake-scenario": "reset-mid-stream"}) as r:
                await r.read()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(fake_url + "/v1/responses", json={"model": "gpt-4o"}, headers={"x-fake-scenario": "truncated-json"}) as r:
                await r.read()
        async with http.post(fake_url + "/v1/responses", json=stream, headers={"x-fake-scenario": "no-terminal"}) as r:
            kinds = [e["type"] for e in sse_payloads(await r.read())]
            assert "response.output_text.delta" in kinds and "response.completed" not in kinds
        async with http.post(fake_url + "/v1/responses", json=stream, headers={"x-fake-scenario": "gzip", "x-fake-deltas": "3"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            import zlib

            events = sse_payloads(zlib.decompress(await r.read(), wbits=31))
            assert events[-1]["type"] == "response.completed"
        async with http.post(fake_url + "/v1/responses", json={"model": "gpt-4o"}, headers={"x-fake-scenario": "non-utf8"}) as r:
            raw = await r.read()
            with pytest.raises(UnicodeDecodeError):
                raw.decode()
        async with http.post(fake_url + "/v1/responses", json={"model": "gpt-4o"}, headers={"x-fake-scenario": "status:500"}) as r:
            assert r.status == 500 and set((await r.json())["error"]) == {"message", "type", "param", "code"}
        async with http.post(
            fake_url + "/v1/responses",
            json={"model": "gpt-4o"},
            headers={"x-fake-scenario": "stall-before-headers", "x-fake-stall-s": "0.2"},
        ) as r:
            assert r.status == 200 and (await r.json())["status"] == "completed"
        async with http.post(fake_url + "/v1/responses", json={"model": "gpt-4o"}, headers={"x-fake-scenario": "big-body"}) as r:
            big = await r.read()
            assert len(big) > 10 * 1024 * 1024 and json.loads(big)["usage"] is not None
        async with http.post(fake_url + "/v1/nowhere", json={}) as r:
            assert r.status == 404 and (await r.json())["error"]["message"] == "Invalid URL (POST /v1/nowhere)"

    run(call)


def test_websocket_lanes_warmup_errors_and_binary(fake_url: str) -> None:
    ws_url = "ws" + fake_url.removeprefix("http") + "/v1/responses?model=gpt-5"

    async def call(http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(ws_url, headers={"x-fake-deltas": "3"}, protocols=["p.one", "p.two"]) as ws:
            assert ws.protocol == "p.one"
            await ws.send_bytes(b"\x00\xff")
            assert await ws.receive_bytes(timeout=5) == b"\x00\xff"
            await ws.send_str(json.dumps({"type": "response.create", "input": "warm", "generate": False}))
            warm = [json.loads(await ws.receive_str(timeout=5)) for _ in range(2)]
            assert [e["type"] for e in warm] == ["response.created", "response.completed"] and warm[1]["response"]["usage"] is None
            for lane, n in (("a", 5), ("b", 7)):
                create = {
                    "type": "response.create",
                    "stream_id": lane,
                    "previous_response_id": warm[1]["response"]["id"],
                    "metadata": {"fake_usage": {"input_tokens": n, "output_tokens": 1}},
                }
                await ws.send_str(json.dumps(create))
            finals = {}
            while len(finals) < 2:
                event = json.loads(await ws.receive_str(timeout=5))
                assert event["stream_id"] in ("a", "b")
                if event["type"] == "response.completed":
                    finals[event["stream_id"]] = event["response"]
            assert finals["a"]["usage"]["input_tokens"] == 5 and finals["b"]["usage"]["input_tokens"] == 7
            assert finals["a"]["model"] == "gpt-5-2025-08-07"
            await ws.send_str(json.dumps({"type": "response.create", "previous_response_id": "resp_unknown"}))
            error = json.loads(await ws.receive_str(timeout=5))
            assert error["type"] == "error" and error["error"]["code"] == "previous_response_not_found"
        async with http.get(fake_url + "/__fake/ws") as r:
            log = await r.json()
        assert log[-1]["path_qs"] == "/v1/responses?model=gpt-5" and log[-1]["closed_at"] is not None

    run(call)


def test_websocket_steer_ends_incomplete_and_starts_a_successor(fake_url: str) -> None:
    ws_url = "ws" + fake_url.removeprefix("http") + "/v1/responses"

    async def call(http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(ws_url, headers={"x-fake-deltas": "50", "x-fake-chunk-delay-ms": "5"}) as ws:
            await ws.send_str(json.dumps({"type": "response.create", "model": "gpt-4o", "input": "go", "stream_id": "s"}))
            first = json.loads(await ws.receive_str(timeout=5))
            await ws.send_str(json.dumps({"type": "response.steer", "previous_response_id": first["response"]["id"], "input": "also"}))
            events = [first]
            while sum(e["type"] == "response.completed" for e in events) < 1:
                events.append(json.loads(await ws.receive_str(timeout=5)))
        kinds = [e["type"] for e in events]
        assert "response.steer.accepted" in kinds and "response.incomplete" in kinds
        steered = next(e for e in events if e["type"] == "response.incomplete")["response"]
        assert steered["incomplete_details"] == {"reason": "steered"} and steered["id"] == first["response"]["id"]
        successor = events[-1]["response"]
        assert successor["previous_response_id"] == steered["id"] and all(e["stream_id"] == "s" for e in events)

    run(call)


def test_websocket_refusal(fake_url: str) -> None:
    async def call(http: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect("ws" + fake_url.removeprefix("http") + "/v1/responses", headers={"x-fake-ws-refuse": "401"})
        assert refused.value.status == 401

    run(call)
