"""Attribution (SPEC §10): `Meter-Tag-*` tags and sessions, end to end.

The official SDK talks to a real Meter in front of the fake provider; rows are
read from the real ledger (a DuckDB file, or PostgreSQL for two replicas).
Meter's own headers must never reach the upstream: the fake shows what it got.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from meter.attribution import SessionChains, header_tags, request_tags, resolve_links, take_meter_headers
from meter.record import Record

from .conftest import SECRET_KEY, clear_upstream_requests, upstream_requests

TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def sdk(base_url: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0, default_headers=headers or None)


async def metric(admin_url: str, line_start: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(admin_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def meter_headers_in(requests: list[dict[str, Any]]) -> list[str]:
    return [name for r in requests for name, _ in r["headers"] if name.lower().startswith(("meter-tag-", "meter-session"))]


# --- tags -------------------------------------------------------------------------


async def test_tags_merge_headers_over_metadata_and_never_go_upstream(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await clear_upstream_requests(upstream.url)
    client = sdk(meter.url, **{"Meter-Tag-Team": "search", "Meter-Tag-Run_ID": "r-1", "Meter-Session": "run-1"})
    response = await client.responses.create(model="gpt-4o", input="hi", metadata={"team": "from-body", "app": "crm"})
    plain = await sdk(meter.url).responses.create(model="gpt-4o", input="hi")
    rows = await meter.rows()
    assert [r["response_id"] for r in rows] == [response.id, plain.id]
    # The header wins on the same name; names are stored lower-case.
    assert json.loads(rows[0]["tags"]) == {"team": "search", "app": "crm", "run_id": "r-1"}
    assert rows[0]["session_id"] == "run-1"
    assert rows[1]["tags"] is None and rows[1]["session_id"] == plain.id
    # Meter's headers take no part in identity: the same key, the same key_id.
    assert rows[0]["key_id"] == rows[1]["key_id"] is not None
    received = await upstream_requests(upstream.url)
    assert len(received) == 2 and meter_headers_in(received) == []
    assert any(name.lower() == "authorization" for name, _ in received[0]["headers"])


async def test_bad_tag_headers_are_dropped_counted_and_the_request_goes_on(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    good = {f"Meter-Tag-t{i:02d}": f"v{i}" for i in range(16)}
    bad = {
        "Meter-Tag-bad.name": "x",  # a dot is no tag name
        "Meter-Tag-" + "n" * 65: "x",  # a name past 64
        "Meter-Tag-long": "v" * 257,  # a value past 256
        "Meter-Tag-t16": "one too many",  # the 17th tag
    }
    response = await sdk(meter.url, **good, **bad).responses.create(model="gpt-4o", input="hi")
    assert response.status == "completed"
    (row,) = await meter.rows()
    assert json.loads(row["tags"]) == {f"t{i:02d}": f"v{i}" for i in range(16)}
    assert await metric(meter.admin_url, 'meter_values_truncated_total{field="tag_headers"}') == 4
    received = await upstream_requests(upstream.url)
    assert meter_headers_in(received[-1:]) == []


def test_header_tags_rules() -> None:
    pairs = [("Meter-Tag-Team", "a"), ("meter-tag-TEAM", "b"), ("Meter-Tag-", "empty name"), ("Other", "x"), ("Meter-Tag-ok_-9", "v" * 256)]
    assert header_tags(pairs) == ({"team": "a", "ok_-9": "v" * 256}, 2)
    assert request_tags(pairs, {"team": "body", "k": "v"}) == {"team": "a", "k": "v", "ok_-9": "v" * 256}
    assert request_tags(None, None) == {}


def test_take_meter_headers_leaves_the_rest() -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Authorization", "Bearer k"), ("Meter-Tag-A", "1"), ("Meter-Session", "s"), ("Meter-Other", "kept"), ("meter-tag-a", "2")])
    assert take_meter_headers(headers) == [("meter-tag-a", "1"), ("meter-tag-a", "2"), ("meter-session", "s")]
    assert list(headers.items()) == [("Authorization", "Bearer k"), ("Meter-Other", "kept")]
    assert take_meter_headers(CIMultiDict([("Authorization", "Bearer k")])) is None


# --- sessions ---------------------------------------------------------------------


async def test_session_rules_one_by_one(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    header = {"Meter-Session": "from-header"}
    conv = await client.responses.create(model="gpt-4o", input="hi", conversation="conv_abc", extra_headers=header)
    conv_obj = await client.responses.create(model="gpt-4o", input="hi", conversation={"id": "conv_obj"})
    by_header = await client.responses.create(model="gpt-4o", input="hi", extra_headers=header)
    first = await client.responses.create(model="gpt-4o", input="hi")
    second = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=first.id)
    third = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=second.id, stream=True)
    async for _ in third:
        pass
    header_beats_chain = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=first.id, extra_headers={"Meter-Session": "fork"})
    chained_to_header = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=by_header.id)
    unknown = await client.responses.create(model="gpt-4o", input="hi", previous_response_id="resp_nowhere")
    rows = await meter.rows()
    sessions = [r["session_id"] for r in rows]
    assert sessions == [
        "conv_abc",  # the conversation, before the header
        "conv_obj",
        "from-header",
        first.id,  # nothing to go by: its own response id
        first.id,  # a chain keeps its first response's session
        first.id,
        "fork",
        "from-header",
        unknown.id,  # a previous response meter never saw: its own id
    ]
    assert [r["response_id"] for r in rows][:3] == [conv.id, conv_obj.id, by_header.id]
    assert rows[6]["response_id"] == header_beats_chain.id and rows[7]["response_id"] == chained_to_header.id


async def test_a_chain_keeps_its_session_across_a_restart(upstream, start_meter, tmp_path) -> None:
    ledger = str(tmp_path / "restart.duckdb")
    before = await start_meter(upstream.url, ledger=ledger)
    first = await sdk(before.url, **{"Meter-Session": "agent-run-7"}).responses.create(model="gpt-4o", input="hi")
    await before.flush()
    await before.stop()
    after = await start_meter(upstream.url, ledger=ledger)
    client = sdk(after.url)
    second = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=first.id)
    await after.flush()  # the writer settles second's session from the ledger
    third = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=second.id)
    rows = await after.rows()
    assert [(r["response_id"], r["session_id"]) for r in rows] == [(first.id, "agent-run-7"), (second.id, "agent-run-7"), (third.id, "agent-run-7")]


async def a_response_of_a_previous_run(upstream_url: str, start_meter: Any, ledger: str, session: str) -> tuple[str, Any]:
    """A response made in `session` by a meter now stopped, and a new meter on the same
    ledger (writing once a second, so that what follows is most often one batch): the
    response's id and the new meter."""
    before = await start_meter(upstream_url, ledger=ledger)
    first = await sdk(before.url, **{"Meter-Session": session}).responses.create(model="gpt-4o", input="hi")
    await before.stop()
    return first.id, await start_meter(upstream_url, ledger=ledger, flush_interval=1.0)


async def test_a_chain_unknown_to_the_request_path_is_settled_by_the_writer(upstream, start_meter, tmp_path) -> None:
    """Both links unknown to the request path (no flush between them: most often one
    batch, where the second link finds the first in the batch itself)."""
    first_id, after = await a_response_of_a_previous_run(upstream.url, start_meter, str(tmp_path / "batch.duckdb"), "batch-run")
    client = sdk(after.url)
    second = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=first_id)
    third = await client.responses.create(model="gpt-4o", input="hi", previous_response_id=second.id)
    rows = await after.rows()
    assert [(r["response_id"], r["session_id"]) for r in rows][1:] == [(second.id, "batch-run"), (third.id, "batch-run")]


async def test_a_chain_keeps_its_session_across_replicas_on_postgresql(upstream, start_meter, pg_url) -> None:
    one = await start_meter(upstream.url, ledger=pg_url)
    two = await start_meter(upstream.url, ledger=pg_url)
    first = await sdk(one.url, **{"Meter-Session": "fleet-run"}).responses.create(model="gpt-4o", input="hi")
    await one.flush()
    second = await sdk(two.url).responses.create(model="gpt-4o", input="hi", previous_response_id=first.id)
    await two.flush()
    third = await sdk(one.url).responses.create(model="gpt-4o", input="hi", previous_response_id=second.id)
    rows = await one.rows()
    assert [(r["response_id"], r["session_id"]) for r in rows] == [(first.id, "fleet-run"), (second.id, "fleet-run"), (third.id, "fleet-run")]


# --- WebSocket --------------------------------------------------------------------


async def ws_turns(base_url: str, headers: dict[str, str], turns: list[dict[str, Any]]) -> list[str]:
    """Responses created one after the other on one socket; their ids."""
    ids = []
    async with sdk(base_url).responses.connect(extra_headers=headers) as conn:
        for turn in turns:
            await conn.response.create(model="gpt-4o", input="hi", **turn)
            while True:
                event = conn.parse_event(await asyncio.wait_for(conn.recv_bytes(), 10))
                if event.type in TERMINAL:
                    ids.append(event.response.id)  # type: ignore[union-attr]
                    break
    return ids


async def test_websocket_handshake_tags_apply_to_every_response_and_a_socket_is_one_session(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as s, s.delete(upstream.url + "/__fake/ws") as r:
        await r.read()
    ids = await ws_turns(
        meter.url,
        {"Meter-Tag-Team": "ws-team", "Meter-Tag-App": "from-header"},
        [{"metadata": {"app": "from-body", "turn": "1"}}, {"metadata": {"turn": "2"}}, {}],
    )
    rows = await meter.rows()
    assert [r["response_id"] for r in rows] == ids and len(ids) == 3
    assert [json.loads(r["tags"]) for r in rows] == [
        {"app": "from-header", "turn": "1", "team": "ws-team"},
        {"turn": "2", "team": "ws-team", "app": "from-header"},
        {"team": "ws-team", "app": "from-header"},
    ]
    assert [r["session_id"] for r in rows] == [ids[0]] * 3  # no session source: the socket is one
    async with aiohttp.ClientSession() as s, s.get(upstream.url + "/__fake/ws") as r:
        log = await r.json()
    assert log and meter_headers_in(log) == []
    assert any(name.lower() == "authorization" for name, _ in log[0]["headers"])  # the log does show headers


async def test_websocket_session_sources(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    by_header = await ws_turns(meter.url, {"Meter-Session": "ws-run"}, [{}, {}])
    by_conversation = await ws_turns(meter.url, {}, [{"conversation": "conv_ws"}, {}])
    continued = await ws_turns(meter.url, {}, [{"previous_response_id": by_header[1]}, {}])
    rows = await meter.rows()
    assert [r["response_id"] for r in rows] == by_header + by_conversation + continued
    assert [r["session_id"] for r in rows] == [
        "ws-run",
        "ws-run",
        "conv_ws",
        "conv_ws",  # no source of its own: it follows the socket's first response
        "ws-run",  # continues a response of another socket: that chain's session
        "ws-run",  # and the socket follows its first response
    ]


# --- the parts --------------------------------------------------------------------


def _record(rid: str | None, prev: str | None = None, session: str | None = None) -> Record:
    return Record(id=None, started_at=0.0, finished_at=0.0, method="POST", path="/v1/responses", endpoint="responses", response_id=rid, previous_response_id=prev, session_id=session, session_of=prev)


def test_resolve_sessions_in_batch_order_then_the_store_then_the_fallback() -> None:
    a = _record("b", prev="a", session="b")
    b = _record("c", prev="b", session="c")
    c = _record("d", prev="gone", session="d")
    # The store's rows newest first: each response's earliest row with a session wins.
    stored = [("a", "responses.retrieve", "not this: a later row", None, None, None, None), ("a", "responses", "S", None, None, None, None),
              ("a", "responses", None, None, None, None, None), ("b", "responses", "not this: b is settled in the batch", None, None, None, None)]
    assert resolve_links([a, b, c], stored) == 0
    assert [r.session_id for r in (a, b, c)] == ["S", "S", "d"]
    assert all(r.session_of is None for r in (a, b, c))


def test_session_chains_are_bounded_in_entries_and_bytes() -> None:
    chains = SessionChains(max_entries=1000, max_bytes=64 << 10)
    for i in range(5000):
        chains.put(f"resp_{i:04d}" + "x" * 10_000, "s" * 10_000)  # ids past 256 kept as digests, sessions cut
    assert len(chains) <= 1000 and chains.held <= 64 << 10
    last = "resp_4999" + "x" * 10_000
    assert chains.get(last) == "s" * 256
    small = SessionChains(max_entries=3)
    for i in range(10):
        small.put(f"r{i}", f"s{i}")
    assert len(small) == 3 and small.get("r9") == "s9" and small.get("r0") is None


@pytest.mark.parametrize("longest", [False, True])
def test_session_chains_hold_at_most_their_bytes_in_memory(longest: bool) -> None:
    """What `max_bytes` bounds is the memory the map holds, measured, not only its characters."""
    import tracemalloc

    chains = SessionChains()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(30_000):  # past the bound of either kind
            rid = f"resp_{i:0251x}" if longest else f"resp_{i:048x}"
            chains.done(None, _record(rid, session="s" * 250 + f"{i:06x}" if longest else rid))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(chains) > (10_000 if longest else 20_000)
    assert held <= 8 << 20, f"{held / 2**20:.2f} MiB"


@pytest.mark.parametrize("conversation", ["conv_1", {"id": "conv_1"}])
def test_conversation_is_read_as_string_or_object(conversation: Any) -> None:
    from meter.observe.facts import request_facts

    assert request_facts(json.dumps({"model": "m", "conversation": conversation}).encode()).conversation == "conv_1"
    assert request_facts(b'{"conversation": 5}').conversation is None


def test_a_spooled_record_keeps_its_unsettled_chain() -> None:
    """A record spooled during an outage still has its session settled when replayed."""
    from meter.ledger.spool import record_from_json, record_to_json

    back = record_from_json(record_to_json(_record("resp_b", prev="resp_a", session="resp_b")))
    assert (back.session_of, back.session_id, back.previous_response_id) == ("resp_a", "resp_b", "resp_a")
    assert "session_of" not in record_to_json(_record("resp_c", session="run"))


async def test_invalid_bytes_in_a_tag_header_and_a_lone_surrogate_in_metadata_keep_the_full_row(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    host, port = meter.meter.proxy_address
    body = b'{"model": "gpt-4o", "input": "hi", "metadata": {"a": "\\ud800"}}'
    head = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + SECRET_KEY.encode() + b"\r\n"
        b"Meter-Tag-Team: x\xffy\r\nMeter-Session: s\xfe\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    (row,) = await meter.rows()
    assert json.loads(row["tags"]) == {"a": "\ufffd", "team": "x\ufffdy"}
    assert row["session_id"] == "s\ufffd"
    assert row["model_requested"] == "gpt-4o" and row["error_type"] is None and row["input_tokens"] is not None


async def test_meter_headers_the_connection_header_names_are_hop_by_hop(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {
        "Authorization": f"Bearer {SECRET_KEY}",
        "Connection": "keep-alive, Meter-Tag-Hop, Meter-Session",
        "Meter-Tag-Hop": "dropped",
        "Meter-Session": "dropped",
        "Meter-Tag-Kept": "yes",
    }
    async with aiohttp.ClientSession() as s, s.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers=headers) as r:
        answer = await r.json()
    (row,) = await meter.rows()
    assert json.loads(row["tags"]) == {"kept": "yes"}
    assert row["session_id"] == answer["id"] == row["response_id"]


async def test_a_huge_session_header_is_cut_to_the_ledger_bound_and_counted(upstream, start_meter) -> None:
    """A client's 32 KiB Meter-Session header: the request goes on, the row keeps the
    first 256 characters, the cut is counted, and a chain from it keeps that session."""
    meter = await start_meter(upstream.url)
    client = sdk(meter.url)
    huge = "s" * 32_768
    first = await client.responses.create(model="gpt-4o", input="hi", extra_headers={"Meter-Session": huge})
    await client.responses.create(model="gpt-4o", input="hi", previous_response_id=first.id)
    rows = await meter.rows()
    assert [r["session_id"] for r in rows] == [huge[:256], huge[:256]]
    assert await metric(meter.admin_url, 'meter_values_truncated_total{field="session_id"}') >= 1
