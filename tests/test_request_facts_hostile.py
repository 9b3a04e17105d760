"""What meter keeps of a request's metadata is bounded like OpenAI's own metadata
(SPEC §2b): 16 pairs, keys up to 64 characters, values up to 512, strings (other
values as their JSON text, cut); nesting depth never loses a record."""

from __future__ import annotations

import json
import socket
import time

import orjson

from meter.observe import request_facts

from .conftest import SECRET_KEY, ledger_rows


def body(metadata: object, **extra: object) -> bytes:
    return json.dumps({"model": "gpt-4o", "input": "hi", "metadata": metadata, **extra}).encode()


def test_tags_keep_sixteen_pairs_of_bounded_strings() -> None:
    metadata = {f"k{i:02d}" + "x" * (70 if i == 0 else 0): ("v" * 600 if i == 1 else f"v{i}") for i in range(40)}
    facts = request_facts(body(metadata))
    tags = json.loads(facts.tags or "")
    assert len(tags) == 16
    assert max(len(k) for k in tags) <= 64 and max(len(v) for v in tags.values()) <= 512
    assert tags["k02"] == "v2" and ("k00" + "x" * 61) in tags
    assert facts.cut == ("tags",)


def test_non_string_values_are_their_json_text() -> None:
    facts = request_facts(body({"n": 3, "flag": True, "obj": {"a": [1, 2]}, "big": list(range(1000))}))
    tags = json.loads(facts.tags or "")
    assert tags["n"] == "3" and tags["flag"] == "true" and json.loads(tags["obj"]) == {"a": [1, 2]}
    assert len(tags["big"]) == 512 and tags["big"].startswith("[0,1,2")
    assert facts.cut == ("tags",)


def test_small_metadata_is_kept_as_sent_and_not_counted_as_cut() -> None:
    facts = request_facts(body({"team": "search", "ünï": "✓"}))
    assert json.loads(facts.tags or "") == {"team": "search", "ünï": "✓"}
    assert facts.cut == ()


def test_deep_nesting_keeps_everything_else() -> None:
    deep: object = "end"
    for _ in range(600):  # past orjson's 254 levels for writing, within its 1024 for reading
        deep = {"d": deep}
    facts = request_facts(body({"deep": deep, "team": "a"}, user="u-1"))
    assert (facts.model, facts.user_id) == ("gpt-4o", "u-1")
    tags = json.loads(facts.tags or "")
    assert tags["team"] == "a" and tags["deep"].startswith('{"d":{"d":') and len(tags["deep"]) <= 512


def test_millions_of_metadata_keys_cost_the_loop_little() -> None:
    # 3.7 M metadata keys once stalled every request for 3.9 s; a body with more
    # members than any real request is not decoded, and says it was cut.
    metadata = {f"k{i}": "v" for i in range(1_000_000)}
    raw = orjson.dumps({"model": "gpt-4o", "input": "hi", "metadata": metadata})
    start = time.process_time()
    facts = request_facts(raw)
    spent = time.process_time() - start
    assert facts.cut == ("request",) and facts.tags is None
    assert spent < 0.1, f"reading the facts of a body with a million metadata keys took {spent:.2f} s of CPU"


def test_a_large_real_request_is_still_read() -> None:
    # A long agent conversation: megabytes of input, far fewer members than the bound.
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 2000}]} for _ in range(3000)]
    facts = request_facts(orjson.dumps({"model": "gpt-5", "input": items, "metadata": {"team": "a"}}))
    assert facts.model == "gpt-5" and json.loads(facts.tags or "") == {"team": "a"} and facts.cut == ()


def test_deeply_nested_metadata_through_meter_serve_keeps_the_row(upstream, meter_process, tmp_path) -> None:
    ledger = tmp_path / "l.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    # Metadata nested 1,000 deep: within what a JSON reader takes (1,024 levels),
    # past what orjson writes (254) and what Python's json writes (its recursion limit).
    payload = ('{"model":"gpt-4o","input":"hi","user":"u-9","metadata":{"team":"a","deep":' + '{"d":' * 1000 + '"x"' + "}" * 1000 + "}}").encode()
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {SECRET_KEY}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", meter.port), timeout=30) as s:
        s.sendall(head + payload)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 ")
    meter.stop()
    [row] = ledger_rows(ledger)
    assert row["key_id"] is not None and row["endpoint"] == "responses"
    assert row["error_type"] != "meter_record_error"
    assert (row["model_requested"], row["user_id"]) == ("gpt-4o", "u-9")
    tags = json.loads(row["tags"])
    assert tags["team"] == "a" and isinstance(tags["deep"], str) and 0 < len(tags["deep"]) <= 512


async def test_cut_metadata_and_long_user_ids_are_counted(upstream, start_meter) -> None:
    import aiohttp

    meter = await start_meter(upstream.url)
    metadata = {f"k{i:02d}": "v" for i in range(40)}
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    body = {"model": "gpt-4o", "input": "hi", "metadata": metadata, "user": "u" * 5000}
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", json=body, headers=headers) as r:
        assert r.status == 200
        await r.read()
    [row] = await meter.rows()
    assert len(json.loads(row["tags"])) == 16 and row["user_id"] == "u" * 256
    async with aiohttp.ClientSession() as s, s.get(meter.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'meter_values_truncated_total{field="tags"} 1.0' in text
    assert 'meter_values_truncated_total{field="user_id"} 1.0' in text


def test_a_lone_surrogate_in_json_does_not_cost_the_facts_or_the_usage() -> None:
    # "\ud800" is valid JSON that orjson refuses; the provider echoes `user` in its answer.
    from meter.observe import observe_json_body

    facts = request_facts(b'{"model":"gpt-4o","input":"hi","user":"\\ud800"}')
    assert facts.model == "gpt-4o" and facts.user_id == "\ud800"  # the ledger makes it U+FFFD
    obs = observe_json_body(
        "responses",
        b'{"id":"resp_1","object":"response","status":"completed","model":"gpt-4o","user":"\\ud800",'
        b'"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}',
    )
    assert obs.usage is not None and obs.usage.total_tokens == 5 and obs.unreadable is None
