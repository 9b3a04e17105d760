"""The other Responses endpoints through a real meter (SPEC §2-3): compact,
input_tokens, cancel, delete, resumed background streams, and prefixed layouts.

Recorded real answers (`tests/fixtures`) are replayed by the fake provider
where there are some (compact, input_tokens, Azure); the rest use its live routes.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from .conftest import SECRET_KEY, load_fixture
from .test_metrics import scrape

AUTH = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
USAGE = {"input_tokens": 50, "cached_tokens": 10, "cache_write_tokens": 0, "output_tokens": 20, "reasoning_tokens": 4}
USAGE_COLUMNS = ("input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "web_search_calls", "cache_status", "cache_missed_tokens")


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0)


def fixture_header(name: str, index: int) -> dict[str, str]:
    return {"x-fake-fixture": f"{name}#{index}"}


def no_usage(row: dict[str, Any]) -> bool:
    return all(row[c] is None for c in USAGE_COLUMNS)


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(url, data=body, headers=headers) as r:
        return r.status, await r.read()


async def test_compact_metered_with_the_requests_model(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    name = "openai_responses__openai_responses_compact_messages_direct.json"
    inter = load_fixture(name)["interactions"][2]
    request = inter["request"]
    model = json.loads(request["body"])["model"]
    through = await post(meter.url + request["path"], request["body"].encode(), {**AUTH, **fixture_header(name, 2)})
    direct = await post(upstream.url + request["path"], request["body"].encode(), {**AUTH, **fixture_header(name, 2)})
    assert through == direct and through[1] == inter["response"]["body"].encode()
    [row] = await meter.rows()
    expected = inter["expected"]
    assert expected["model"] is None  # the answer names no model ...
    assert row["endpoint"] == "responses.compact" and row["outcome"] == "completed" and row["status_code"] == 200
    assert row["model"] == row["model_requested"] == model  # ... so the request's is recorded
    assert row["response_id"] == expected["response_id"]
    for key in ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens"):
        assert row[key] == expected["usage"][key]


async def test_compact_through_the_sdk(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    compacted = await sdk(meter.url).responses.compact(model="gpt-5", input="a long conversation", extra_headers={"x-fake-usage": json.dumps(USAGE)})
    [row] = await meter.rows()
    assert row["endpoint"] == "responses.compact" and row["model"] == "gpt-5" and row["response_id"] == compacted.id
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["total_tokens"]) == (50, 10, 20, 70)


@pytest.mark.parametrize("name", ["openai_responses__responses_count_tokens.json", "openai_responses__responses_count_tokens_with_tools.json"])
async def test_input_tokens_recorded_without_usage(upstream, start_meter, name: str) -> None:
    meter = await start_meter(upstream.url)
    inter = load_fixture(name)["interactions"][0]
    request = inter["request"]
    through = await post(meter.url + request["path"], request["body"].encode(), {**AUTH, **fixture_header(name, 0)})
    assert through[0] == 200 and json.loads(through[1])["input_tokens"] > 0
    counted = await sdk(meter.url).responses.input_tokens.count(model="gpt-4o", input="hello")
    assert counted.input_tokens > 0
    rows = await meter.rows()
    assert [r["endpoint"] for r in rows] == ["responses.input_tokens"] * 2
    assert rows[0]["model_requested"] == json.loads(request["body"])["model"] and rows[1]["model_requested"] == "gpt-4o"
    for row in rows:
        assert row["outcome"] == "completed" and row["status_code"] == 200
        assert no_usage(row)  # a count, not consumption
        assert row["cost_usd"] is None


async def test_cancel_and_delete_recorded_without_usage(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    created = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers={"x-fake-usage": json.dumps(USAGE), "x-fake-polls": "3"})
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    await client.responses.delete(created.id)
    # A prefixed, versioned layout classifies the same.
    async with aiohttp.ClientSession() as s, s.delete(meter.url + f"/openai/v1/responses/{created.id}?api-version=2025-04-01-preview", headers=AUTH) as r:
        assert r.status == 200
    rows = await meter.rows()
    assert [r["endpoint"] for r in rows] == ["responses", "responses.cancel", "responses.delete", "responses.delete"]
    post_row, cancel_row, *delete_rows = rows
    assert post_row["background"] is True and post_row["outcome"] == "in_progress" and no_usage(post_row)
    assert cancel_row["method"] == "POST" and cancel_row["path"] == f"/v1/responses/{created.id}/cancel"
    assert cancel_row["response_id"] == created.id and cancel_row["outcome"] == "completed"
    for row in (cancel_row, *delete_rows):
        assert row["status_code"] == 200 and no_usage(row)
    assert [r["method"] for r in delete_rows] == ["DELETE", "DELETE"]
    assert delete_rows[1]["path"] == f"/openai/v1/responses/{created.id}"  # the query is not kept


async def test_only_a_final_response_names_the_tier_that_served_it(upstream, start_meter) -> None:
    """SPEC §3: the served tier is read from the final response.  A queued POST, an
    in-progress retrieve and a response cancelled before it ran all say `auto`, the tier
    still to be chosen: none served them, so their rows name none (no `auto` group in
    `meter report --by tier`, no `auto` metric label)."""
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    headers = {"x-fake-usage": json.dumps(USAGE), "x-fake-polls": "1"}
    created = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers=headers)
    polled = await client.responses.retrieve(created.id, extra_headers=headers)
    done = await client.responses.retrieve(created.id, extra_headers=headers)
    other = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers={**headers, "x-fake-polls": "3"})
    cancelled = await client.responses.cancel(other.id)
    # What the upstream said, so that each row below is read from an `auto` answer but the one.
    said = [(r.status, r.service_tier) for r in (created, polled, done, other, cancelled)]
    assert said == [("queued", "auto"), ("in_progress", "auto"), ("completed", "default"), ("queued", "auto"), ("cancelled", "auto")]
    rows = await meter.rows()
    assert [(r["endpoint"], r["service_tier"]) for r in rows] == [
        ("responses", None), ("responses.retrieve", None), ("responses.retrieve", "default"), ("responses", None), ("responses.cancel", None),
    ]
    m = await scrape(meter.admin_url)
    assert m.label_values("meter_requests_total", "service_tier") == {"", "default"}


async def test_background_stream_resumed_counts_usage_once(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    headers = {"x-fake-usage": json.dumps(USAGE), "x-fake-deltas": "6"}
    # A background stream read to its end, then resumed from event 3 and retrieved twice.
    stream = await client.responses.create(model="gpt-4o", input="bg", background=True, stream=True, extra_headers=headers)
    events = [e async for e in stream]
    rid = events[-1].response.id
    assert events[-1].type == "response.completed"
    resumed = await client.responses.retrieve(rid, stream=True, starting_after=3)
    resumed_events = [e async for e in resumed]
    assert resumed_events[0].sequence_number == 4 and resumed_events[-1].type == "response.completed"
    await client.responses.retrieve(rid)
    await client.responses.retrieve(rid)
    rows = await meter.rows()
    assert [r["endpoint"] for r in rows] == ["responses", "responses.retrieve", "responses.retrieve", "responses.retrieve"]
    assert all(r["response_id"] == rid and r["outcome"] == "completed" for r in rows)
    with_usage = [r for r in rows if r["input_tokens"] is not None]
    assert len(with_usage) == 1 and with_usage[0] is rows[0]
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"], rows[0]["total_tokens"]) == (50, 20, 70)
    assert rows[1]["path"] == f"/v1/responses/{rid}" and rows[1]["ttft_ms"] is not None


async def test_background_usage_first_seen_on_a_resumed_stream(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    created = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers={"x-fake-usage": json.dumps(USAGE), "x-fake-polls": "1"})
    assert created.status == "queued"
    resumed = await client.responses.retrieve(created.id, stream=True, starting_after=0)
    assert [e async for e in resumed][-1].type == "response.completed"
    final = await client.responses.retrieve(created.id)
    assert final.status == "completed" and final.usage is not None
    post_row, stream_row, get_row = await meter.rows()
    assert no_usage(post_row) and post_row["outcome"] == "in_progress"
    assert stream_row["endpoint"] == "responses.retrieve" and stream_row["background"] is True
    assert (stream_row["input_tokens"], stream_row["output_tokens"]) == (50, 20)
    assert no_usage(get_row)  # the same response id: counted once


async def test_recorded_background_resume_counts_once(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    name = "openai_responses__background_mode_streaming_starting_after_vcr.json"
    interactions = load_fixture(name)["interactions"]
    async with aiohttp.ClientSession() as s:
        for i, inter in enumerate(interactions):
            request = inter["request"]
            body = request.get("body") or None
            async with s.request(request["method"], meter.url + request["path"], data=body.encode() if body else None, headers={**AUTH, **fixture_header(name, i)}) as r:
                assert await r.read() == inter["response"]["body"].encode()
    rows = await meter.rows()
    expected = interactions[0]["expected"]
    assert [r["response_id"] for r in rows] == [expected["response_id"]] * 2
    assert [r["endpoint"] for r in rows] == ["responses", "responses.retrieve"]
    assert rows[0]["input_tokens"] == expected["usage"]["input_tokens"] and rows[0]["total_tokens"] == expected["usage"]["total_tokens"]
    assert no_usage(rows[1])


@pytest.mark.parametrize(
    "path",
    ["/openai/v1/responses?api-version=2025-04-01-preview", "/v1/responses?beta=true", "/gateway/openai/v1/responses?api-version=preview"],
)
async def test_prefixed_and_query_layouts_are_responses(upstream, start_meter, path: str) -> None:
    meter = await start_meter(upstream.url)
    name = "openai_responses__azure_responses_reasoning_context_default_wire_contract_gpt-5.4_.json"
    inter = load_fixture(name)["interactions"][0]
    status, body = await post(meter.url + path, inter["request"]["body"].encode(), {**AUTH, **fixture_header(name, 0)})
    assert status == 200 and body == inter["response"]["body"].encode()
    [row] = await meter.rows()
    expected = inter["expected"]
    assert row["endpoint"] == "responses" and row["path"] == path.split("?")[0]
    assert row["model"] == expected["model"] and row["response_id"] == expected["response_id"]
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (
        expected["usage"]["input_tokens"],
        expected["usage"]["output_tokens"],
        expected["usage"]["total_tokens"],
    )


async def test_cancel_answer_with_usage_is_still_recorded_without_usage(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    created = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers={"x-fake-usage": json.dumps(USAGE), "x-fake-polls": "3"})
    cancelled = await client.responses.cancel(created.id, extra_headers={"x-fake-cancel-usage": "1"})
    assert cancelled.status == "cancelled" and cancelled.usage is not None  # the answer carries usage ...
    _, cancel_row = await meter.rows()
    assert cancel_row["endpoint"] == "responses.cancel"
    assert no_usage(cancel_row)  # ... the row does not (SPEC §3)


async def test_resumed_stream_row_says_stream(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    created = await client.responses.create(model="gpt-4o", input="bg", background=True, extra_headers={"x-fake-polls": "1"})
    resumed = await client.responses.retrieve(created.id, stream=True, starting_after=0)
    assert [e async for e in resumed]
    _, stream_row = await meter.rows()
    assert stream_row["stream"] is True  # a GET asks for its stream in the query
