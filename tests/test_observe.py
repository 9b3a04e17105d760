"""The observer against recorded provider traffic: any chunking, either line ending, comments.

Expected values come from the fixtures' own `expected` blocks (read off the
recorded answers by the recorder), not from meter.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.observe import (
    SSEObserver,
    endpoint_for,
    observe_json_body,
    observer_for,
    request_facts,
    usage_anomalies,
)

from .conftest import FIXTURES


def _interactions() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((FIXTURES / "openai").glob("*.json")):
        for i, inter in enumerate(json.loads(path.read_text())["interactions"]):
            out.append((f"{path.name}#{i}", inter))
    return out


INTERACTIONS = _interactions()
STREAMS = [(name, i) for name, i in INTERACTIONS if i["response"]["stream"] and i["response"]["status"] == 200 and i["expected"]["usage"]]
JSON_BODIES = [
    (name, i)
    for name, i in INTERACTIONS
    if not i["response"]["stream"] and i["response"]["status"] == 200 and i["expected"]["usage"] and "input_tokens" not in i["request"]["path"]
]


def _kind(path: str) -> str:
    return "chat" if "chat/completions" in path or "embeddings" in path else "responses"


def _check(obs, expected: dict) -> None:
    usage = expected["usage"]
    assert obs.usage is not None
    assert obs.usage.input_tokens == usage["input_tokens"]
    assert obs.usage.output_tokens == usage["output_tokens"]
    assert obs.usage.total_tokens == usage["total_tokens"]
    assert (obs.usage.cached_tokens or 0) == usage["cached_tokens"]
    assert (obs.usage.reasoning_tokens or 0) == usage["reasoning_tokens"]
    if expected.get("model"):
        assert obs.model == expected["model"]
    if expected.get("service_tier"):
        assert obs.service_tier == expected["service_tier"]
    if expected.get("response_id"):
        assert obs.response_id == expected["response_id"]


def test_fixtures_cover_the_cases_that_matter() -> None:
    assert len(STREAMS) >= 10
    assert len(JSON_BODIES) >= 50
    assert any(i["expected"]["usage"]["cached_tokens"] > 0 for _, i in INTERACTIONS if i["expected"]["usage"])
    assert any(i["expected"]["usage"]["reasoning_tokens"] > 0 for _, i in INTERACTIONS if i["expected"]["usage"])


@pytest.mark.parametrize("name,inter", STREAMS, ids=[n for n, _ in STREAMS])
def test_stream_whole(name: str, inter: dict) -> None:
    obs = SSEObserver(_kind(inter["request"]["path"]))
    obs.feed(inter["response"]["body"].encode())
    _check(obs.finish(), inter["expected"])


@pytest.mark.parametrize("name,inter", JSON_BODIES, ids=[n for n, _ in JSON_BODIES])
def test_json_body(name: str, inter: dict) -> None:
    obs = observe_json_body(_kind(inter["request"]["path"]), inter["response"]["body"].encode())
    _check(obs, inter["expected"])


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def _with_comments_and_crlf(body: str, crlf: bool, comments: bool) -> bytes:
    events = body.split("\n\n")
    if comments:
        events = [": keep-alive\n" + e if e else e for e in events]
    text = "\n\n".join(events)
    if crlf:
        text = text.replace("\n", "\r\n")
    return text.encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=10_000),
    cuts=st.lists(st.integers(min_value=0, max_value=10**9), max_size=40),
    crlf=st.booleans(),
    comments=st.booleans(),
)
def test_stream_any_split(index: int, cuts: list[int], crlf: bool, comments: bool) -> None:
    _, inter = STREAMS[index % len(STREAMS)]
    data = _with_comments_and_crlf(inter["response"]["body"], crlf, comments)
    obs = SSEObserver(_kind(inter["request"]["path"]))
    for piece in _split(data, cuts):
        obs.feed(piece)
    _check(obs.finish(), inter["expected"])


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10**9), max_size=30))
def test_stream_byte_at_a_time_equivalent(cuts: list[int]) -> None:
    # One byte per chunk is the harshest split; the result must not depend on it.
    _, inter = STREAMS[0]
    data = inter["response"]["body"].encode()
    whole = SSEObserver(_kind(inter["request"]["path"]))
    whole.feed(data)
    bytewise = SSEObserver(_kind(inter["request"]["path"]))
    for i in range(len(data)):
        bytewise.feed(data[i : i + 1])
    assert whole.finish().usage == bytewise.finish().usage


def test_multiline_data_and_no_event_lines() -> None:
    completed = {
        "type": "response.completed",
        "response": {"id": "resp_x", "model": "m", "status": "completed", "service_tier": "flex", "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}},
    }
    text = json.dumps(completed, indent=1)  # several lines -> several data: lines
    body = "".join("data: " + line + "\n" for line in text.splitlines()) + "\n"
    obs = SSEObserver("responses")
    obs.feed(body.encode())
    result = obs.finish()
    assert result.usage is not None and result.usage.total_tokens == 5
    assert result.service_tier == "flex"
    assert result.terminal


def test_served_tier_comes_from_the_terminal_event_not_created() -> None:
    created = {"type": "response.created", "response": {"id": "r", "model": "m", "status": "in_progress", "service_tier": "auto"}}
    done = {"type": "response.completed", "response": {"id": "r", "model": "m", "status": "completed", "service_tier": "priority", "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}}
    obs = SSEObserver("responses")
    obs.feed(f"event: response.created\ndata: {json.dumps(created)}\n\n".encode())
    assert obs.obs.service_tier is None
    obs.feed(f"event: response.completed\ndata: {json.dumps(done)}\n\n".encode())
    assert obs.finish().service_tier == "priority"


def test_truncated_stream_keeps_identity_and_no_usage() -> None:
    _, inter = STREAMS[0]
    body = inter["response"]["body"].encode()
    cut = body.rfind(b"event: response.completed") if b"event: response.completed" in body else len(body) // 2
    obs = SSEObserver(_kind(inter["request"]["path"]))
    obs.feed(body[:cut])
    result = obs.finish()
    assert result.usage is None  # never a guessed 0
    assert not result.terminal


def test_first_token_time_is_the_first_delta() -> None:
    ticks = iter(range(1, 100))
    obs = SSEObserver("responses", clock=lambda: float(next(ticks)))
    obs.feed(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\n\n")
    assert obs.obs.first_token_at is None
    obs.feed(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"a\"}\n\n")
    first = obs.obs.first_token_at
    obs.feed(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"b\"}\n\n")
    assert first is not None and obs.obs.first_token_at == first


def test_chat_stream_usage_chunk_and_ttft() -> None:
    chunks = [
        {"id": "c1", "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": None},
        {"id": "c1", "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "choices": [{"delta": {"content": "Hi"}}], "usage": None},
        {"id": "c1", "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 0}}},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    ticks = iter(range(1, 100))
    obs = SSEObserver("chat", clock=lambda: float(next(ticks)))
    obs.feed(body.encode())
    result = obs.finish()
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.cache_write_tokens) == (9, 4, 2)
    assert result.first_token_at == 1.0  # the role-only chunk is not a token


def test_responses_usage_details_and_diagnostics() -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-5.5",
        "status": "completed",
        "service_tier": "default",
        "usage": {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30},
            "output_tokens": 50,
            "output_tokens_details": {"reasoning_tokens": 20},
            "total_tokens": 150,
        },
        "tool_usage": {"web_search": {"num_requests": 2}},
        "prompt_cache_diagnostics": {"type": "cache_miss", "reason": "tools_changed", "cache_missed_tokens": 40},
    }
    obs = observe_json_body("responses", json.dumps(body).encode())
    u = obs.usage
    assert u is not None
    assert (u.cached_tokens, u.cache_write_tokens, u.reasoning_tokens, u.web_search_calls) == (60, 30, 20, 2)
    assert (u.cache_status, u.cache_missed_tokens) == ("miss:tools_changed", 40)
    assert usage_anomalies(u) == ()


@pytest.mark.parametrize(
    "usage,kinds",
    [
        ({"input_tokens": 10, "output_tokens": 5, "total_tokens": 16}, ("total_mismatch",)),
        ({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 3}, "output_tokens": 5, "total_tokens": 15}, ("cache_exceeds_input",)),
        ({"input_tokens": 10, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 6}, "total_tokens": 15}, ("reasoning_exceeds_output",)),
    ],
)
def test_invariant_violations_are_reported_not_fixed(usage: dict, kinds: tuple) -> None:
    obs = observe_json_body("responses", json.dumps({"id": "r", "object": "response", "status": "completed", "usage": usage}).encode())
    assert obs.usage is not None
    assert obs.usage.total_tokens == usage["total_tokens"]  # recorded as read
    assert usage_anomalies(obs.usage) == kinds


def test_unreadable_bodies_are_said_not_guessed() -> None:
    obs = observe_json_body("responses", b'{"id": "resp_1", "usage": {"input_tok')
    assert obs.usage is None and obs.unreadable and "invalid JSON" in obs.unreadable
    obs = observe_json_body("responses", b"\xff\xfe not utf8")
    assert obs.usage is None and obs.unreadable
    facts = request_facts(b"\x00garbage")
    assert facts.model is None and facts.stream is False


def test_gzip_copy_is_decoded_for_metering() -> None:
    import gzip

    body = json.dumps({"id": "r", "object": "response", "model": "m", "status": "completed", "usage": {"input_tokens": 4, "output_tokens": 1, "total_tokens": 5}}).encode()
    packed = gzip.compress(body)
    observer = observer_for("responses", "application/json", "gzip")
    assert observer is not None
    for i in range(0, len(packed), 7):
        observer.feed(packed[i : i + 7])
    assert observer.finish().usage.total_tokens == 5  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "method,path,endpoint",
    [
        ("POST", "/v1/responses", "responses"),
        ("POST", "/openai/v1/responses?api-version=2025-04-01-preview", "responses"),
        ("POST", "/v1/responses?beta=true", "responses"),
        ("POST", "/prefix/v1/responses/compact", "responses.compact"),
        ("POST", "/v1/responses/input_tokens", "responses.input_tokens"),
        ("GET", "/v1/responses/resp_123", "responses.retrieve"),
        ("GET", "/v1/responses/resp_123?stream=true&starting_after=3", "responses.retrieve"),
        ("DELETE", "/v1/responses/resp_123", "responses.delete"),
        ("POST", "/v1/responses/resp_123/cancel", "responses.cancel"),
        ("GET", "/v1/responses/resp_123/input_items", "other"),
        ("POST", "/v1/chat/completions", "chat.completions"),
        ("POST", "/openai/deployments/gpt4/chat/completions?api-version=1", "chat.completions"),
        ("POST", "/v1/embeddings", "embeddings"),
        ("GET", "/v1/models", "other"),
        ("GET", "/", "other"),
    ],
)
def test_endpoint_classification(method: str, path: str, endpoint: str) -> None:
    assert endpoint_for(method, path) == endpoint


def test_request_facts() -> None:
    facts = request_facts(
        json.dumps(
            {"model": "gpt-5", "stream": True, "background": False, "service_tier": "flex", "safety_identifier": "u-1", "user": "old", "metadata": {"team": "search"}}
        ).encode()
    )
    assert (facts.model, facts.stream, facts.background, facts.service_tier, facts.user_id) == ("gpt-5", True, False, "flex", "u-1")
    assert json.loads(facts.tags or "") == {"team": "search"}


@pytest.mark.parametrize("name,inter", STREAMS, ids=[n for n, _ in STREAMS])
@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("comments", [False, True])
def test_stream_one_event_per_chunk(name: str, inter: dict, crlf: bool, comments: bool) -> None:
    # How providers usually send: each chunk one whole event.  Without comments or
    # CRLF every event is judged by the fast path, the terminal one included.
    body = _with_comments_and_crlf(inter["response"]["body"], crlf, comments)
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    ticks = iter(range(1, 10_000))
    obs = SSEObserver(_kind(inter["request"]["path"]), clock=lambda: float(next(ticks)))
    for event in body.split(sep):
        if event:
            obs.feed(event + sep)
    result = obs.finish()
    _check(result, inter["expected"])
    assert result.first_token_at is not None


@pytest.mark.parametrize("name,inter", STREAMS, ids=[n for n, _ in STREAMS])
@pytest.mark.parametrize("whole", [False, True])
def test_stream_with_crlf_lines_and_bare_lf_blank_lines(name: str, inter: dict, whole: bool) -> None:
    # SSE allows any line end, mixed: here every field line ends in CRLF and each
    # event's blank line is a bare LF, so the events still split on "\n\n" and
    # their names carry a trailing CR into the fast path.
    events = [e.replace("\n", "\r\n") + "\r\n\n" for e in inter["response"]["body"].split("\n\n") if e.strip()]
    obs = SSEObserver(_kind(inter["request"]["path"]))
    for chunk in ["".join(events)] if whole else events:
        obs.feed(chunk.encode())
    result = obs.finish()
    _check(result, inter["expected"])
    assert result.first_token_at is not None
