"""WebSocket mode (SPEC §2a): the official SDK and raw clients through a real meter
to the fake provider's WebSocket, compared with the same traffic sent directly.

Every test checks both halves of the contract: what the client receives through
meter equals what it receives from the upstream, and each ledger row carries
the usage the upstream sent for that response.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time
import types
from typing import Any

import aiohttp
import openai
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from meter.flow import Addons, Flow, build_record
from meter.identity import KeyIdentities
from meter.observe import SSEObserver
from meter.observe.socket import SocketMeter
from meter.websocket import WebSocketRelay, _parsed_messages

from .conftest import SECRET_KEY, ledger_rows

USAGE_A = {"input_tokens": 120, "cached_tokens": 40, "cache_write_tokens": 16, "output_tokens": 30, "reasoning_tokens": 12}
USAGE_B = {"input_tokens": 7, "cached_tokens": 0, "cache_write_tokens": 0, "output_tokens": 3, "reasoning_tokens": 0}
AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}
IDS = re.compile(r"(resp|msg)_[0-9a-f]{32}")
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def ws_url(http_url: str, path: str = "/v1/responses") -> str:
    return "ws" + http_url.removeprefix("http") + path


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=SECRET_KEY, max_retries=0)


def create(**fields: Any) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-4o", "input": "hi", **fields})


def usage_of(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in ("input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "total_tokens"))


def expected_usage(u: dict[str, int]) -> tuple[int, ...]:
    return (u["input_tokens"], u["cached_tokens"], u["cache_write_tokens"], u["output_tokens"], u["reasoning_tokens"], u["input_tokens"] + u["output_tokens"])


async def until_terminal(ws: Any) -> list[dict[str, Any]]:
    events = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        events.append(event)
        if event["type"] in TERMINAL or event["type"] == "error":
            return events


async def ws_log(upstream_url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(upstream_url + "/__fake/ws") as r:
        return await r.json()


async def clear_ws_log(upstream_url: str) -> None:
    async with aiohttp.ClientSession() as s, s.delete(upstream_url + "/__fake/ws") as r:
        await r.read()


# --- the SDK ----------------------------------------------------------------------


async def sdk_session(base_url: str) -> list[bytes]:
    """Two responses on one `client.responses.connect()` socket; every message as received."""
    received: list[bytes] = []
    async with sdk(base_url).responses.connect(extra_headers={"x-fake-deltas": "12"}) as conn:
        for usage in (USAGE_A, USAGE_B):
            # The fake reads `fake_usage` as an object; the API's metadata values are strings.
            await conn.response.create(model="gpt-4o", input="count to ten", service_tier="flex", metadata={"fake_usage": usage})  # type: ignore[dict-item]
            while True:
                raw = await asyncio.wait_for(conn.recv_bytes(), 10)
                received.append(raw)
                event = conn.parse_event(raw)
                if event.type in TERMINAL:
                    break
    return received


async def test_sdk_connect_identical_and_metered(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    through = await sdk_session(meter.url)
    direct = await sdk_session(upstream.url)
    assert len(through) == len(direct) > 30
    assert [IDS.sub("<id>", m.decode()) for m in through] == [IDS.sub("<id>", m.decode()) for m in direct]
    # The SDK's typed view of the messages is the same too.
    parsed = [json.loads(m) for m in through]
    rows = await meter.rows()
    assert len(rows) == 2
    completed = [e["response"] for e in parsed if e["type"] == "response.completed"]
    ends = [i + 1 for i, e in enumerate(parsed) if e["type"] in TERMINAL]
    sizes = [sum(map(len, through[a:b])) for a, b in zip([0, *ends], ends)]  # each response's messages, as received
    for row, response, usage, size in zip(rows, completed, (USAGE_A, USAGE_B), sizes):
        assert row["transport"] == "websocket" and row["stream"] is True and row["endpoint"] == "responses"
        assert row["method"] == "GET" and row["path"] == "/v1/responses" and row["status_code"] == 101
        assert row["outcome"] == "completed"
        assert row["response_id"] == response["id"]
        assert usage_of(row) == expected_usage(usage) == (
            response["usage"]["input_tokens"],
            response["usage"]["input_tokens_details"]["cached_tokens"],
            response["usage"]["input_tokens_details"]["cache_write_tokens"],
            response["usage"]["output_tokens"],
            response["usage"]["output_tokens_details"]["reasoning_tokens"],
            response["usage"]["total_tokens"],
        )
        assert row["model_requested"] == "gpt-4o" and row["model"] == "gpt-4o-2024-08-06"
        assert row["service_tier_requested"] == "flex" and row["service_tier"] == "flex"
        assert row["key_hint"] == "sk-..." + SECRET_KEY[-4:] and row["key_id"]
        # Tags keep metadata as OpenAI does: string values (others as their JSON text).
        assert {k: json.loads(v) for k, v in json.loads(row["tags"]).items()} == {"fake_usage": usage}
        assert row["request_bytes"] > 0 and row["response_bytes"] == size > 1000
        assert 0 < row["ttfb_ms"] <= row["ttft_ms"] <= row["duration_ms"]
    assert rows[0]["started_at"] < rows[1]["started_at"]


async def test_handshake_forwarded_with_headers_query_and_subprotocol(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await clear_ws_log(upstream.url)
    headers = {**AUTH, "X-Custom": "kept", "OpenAI-Beta": "responses_websockets=2026-02-06", "Proxy-Authorization": "Basic Zm9v"}
    async with ws_connect(ws_url(meter.url, "/v1/responses?model=gpt-4o&x=1"), additional_headers=headers, subprotocols=["p.one", "p.two"]) as ws:
        assert ws.subprotocol == "p.one"
        await ws.send(b"\x00\x01\xffbinary")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01\xffbinary"
        await ws.send(create())
        events = await until_terminal(ws)
    [entry] = await ws_log(upstream.url)
    assert entry["path_qs"] == "/v1/responses?model=gpt-4o&x=1"
    sent = {k.lower(): v for k, v in entry["headers"]}
    assert sent["authorization"] == f"Bearer {SECRET_KEY}" and sent["x-custom"] == "kept"
    assert sent["openai-beta"] == "responses_websockets=2026-02-06"
    assert "proxy-authorization" not in sent
    assert sent["sec-websocket-protocol"] == "p.one,p.two"
    assert [k.lower() for k, _ in entry["headers"]].count("sec-websocket-key") == 1
    [row] = await meter.rows()
    assert row["response_id"] == events[-1]["response"]["id"] and row["outcome"] == "completed"


async def test_upstream_path_prefix_is_kept(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url + "/gateway/openai")
    await clear_ws_log(upstream.url)
    async with ws_connect(ws_url(meter.url, "/v1/responses?api-version=preview"), additional_headers=AUTH) as ws:
        await ws.send(create())
        await until_terminal(ws)
    [entry] = await ws_log(upstream.url)
    assert entry["path_qs"] == "/gateway/openai/v1/responses?api-version=preview"
    [row] = await meter.rows()
    assert row["path"] == "/v1/responses" and row["endpoint"] == "responses" and row["input_tokens"] is not None


async def test_binary_messages_echo_unchanged(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    payloads = [bytes(range(256)) * 40, b"", b"\x00" * 3, random.randbytes(1 << 20)]
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH, max_size=None) as ws:
        for p in payloads:
            await ws.send(p)
        for p in payloads:
            assert await asyncio.wait_for(ws.recv(), 5) == p
        await ws.send(create())
        events = await until_terminal(ws)
    # Binary messages are relayed, not metered: the one response is the one row.
    [row] = await meter.rows()
    assert row["response_id"] == events[-1]["response"]["id"]


async def test_aiohttp_still_exposes_its_parsed_message_queue(upstream) -> None:
    """The relay writes a batch when aiohttp has no further message parsed; should an
    aiohttp upgrade move that queue, meter would fall back to a write per frame:
    still correct, but slower than the bare relay.  This says so instead."""
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(upstream.url), headers=AUTH) as ws:
        parsed = _parsed_messages(ws)
        assert not isinstance(parsed, tuple) and len(parsed) == 0  # the queue itself, not the fallback ()
        await ws.send_bytes(b"one")
        await ws.send_bytes(b"two")
        await asyncio.sleep(0.2)  # both echoes arrive and are parsed before anyone receives
        assert len(parsed) == 2
        assert (await ws.receive()).data == b"one" and len(parsed) == 1


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_client_that_stops_reading_holds_the_upstream_back(upstream, meter_process, tmp_path) -> None:
    """meter writes its client's frames in batches of its own; a client that stops
    reading must still stop the upstream (through meter) instead of filling meter's
    memory, and everything arrives, in order, once it reads again."""
    meter = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"))
    assert meter.proc is not None
    block = random.randbytes(1 << 20)
    count = 64  # 64 MiB echoed by the upstream towards a client that reads nothing
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH, max_size=None, max_queue=1) as ws:
        await ws.send(b"warm-up")
        assert await asyncio.wait_for(ws.recv(), 5) == b"warm-up"
        before = rss_bytes(meter.proc.pid)

        async def send_all() -> None:
            for i in range(count):
                await ws.send(i.to_bytes(4, "big") + block)

        sender = asyncio.create_task(send_all())
        peak = before
        for _ in range(30):  # 3 s of not reading
            await asyncio.sleep(0.1)
            peak = max(peak, rss_bytes(meter.proc.pid))
        assert peak - before < 24 << 20, f"meter grew by {(peak - before) >> 20} MiB for a client that does not read"
        for i in range(count):
            message = await asyncio.wait_for(ws.recv(), 30)
            assert message[:4] == i.to_bytes(4, "big") and message[4:] == block
        await asyncio.wait_for(sender, 30)


# --- the Codex flow ----------------------------------------------------------------


async def test_codex_flow_warmup_then_two_chained_turns(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {**AUTH, "OpenAI-Beta": "responses_websockets=2026-02-06", "x-fake-deltas": "4"}
    turns = [USAGE_A, USAGE_B]
    async with ws_connect(ws_url(meter.url), additional_headers=headers) as ws:  # no ?model=
        await ws.send(create(instructions="You are Codex.", generate=False, metadata={"fake_usage": {"input_tokens": 0, "output_tokens": 0}}))
        warm = await until_terminal(ws)
        assert warm[-1]["type"] == "response.completed"
        previous = warm[-1]["response"]["id"]
        ids = [previous]
        for usage in turns:
            await ws.send(create(previous_response_id=previous, input=[{"role": "user", "content": "next"}], metadata={"fake_usage": usage}))
            events = await until_terminal(ws)
            assert events[-1]["type"] == "response.completed"
            previous = events[-1]["response"]["id"]
            ids.append(previous)
    rows = await meter.rows()
    assert [r["response_id"] for r in rows] == ids
    warm_row, first, second = rows
    assert warm_row["outcome"] == "completed" and warm_row["transport"] == "websocket"
    assert usage_of(warm_row) == (None,) * 6  # a warm-up carries no consumption, not a zero
    assert warm_row["cost_usd"] is None
    assert first["previous_response_id"] == ids[0] and second["previous_response_id"] == ids[1]
    assert usage_of(first) == expected_usage(USAGE_A) and usage_of(second) == expected_usage(USAGE_B)
    assert all(r["model_requested"] == "gpt-4o" for r in rows)


async def test_handshake_model_is_the_default_model_requested(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with ws_connect(ws_url(meter.url, "/v1/responses?model=gpt-5"), additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "response.create", "input": "hi"}))
        await until_terminal(ws)
    [row] = await meter.rows()
    assert row["model_requested"] == "gpt-5"


# --- sockets that end mid-response -------------------------------------------------


async def test_close_codes_cross_in_both_directions(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await clear_ws_log(upstream.url)
    # The client closes first: the upstream gets the client's code.
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        await ws.send(create())
        await until_terminal(ws)
        await ws.close(code=4000, reason="bye now")
    deadline = time.monotonic() + 3
    while (entry := (await ws_log(upstream.url))[0])["closed_at"] is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert entry["close_code"] == 4000
    # The upstream closes first: the client gets the upstream's code and reason (tested
    # mid-response in test_upstream_ends_mid_response); here with nothing in flight.
    [row] = await meter.rows()
    assert row["outcome"] == "completed"


async def hang_up(ws: Any, how: str, upstream_url: str) -> float:
    """Close (`close`) or drop (`drop`) the client's socket; the seconds until the
    upstream's side of it ended (the fake upstream's log of its only socket)."""
    hung_up = time.time()
    if how == "close":
        await ws.close()
    else:
        ws.transport.abort()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        [entry] = await ws_log(upstream_url)
        if entry["closed_at"] is not None:
            return float(entry["closed_at"] - hung_up)
        await asyncio.sleep(0.05)
    raise AssertionError("the upstream's side of the socket is still open")


@pytest.mark.parametrize("how", ["close", "drop"])
async def test_client_hangs_up_mid_response(upstream, start_meter, how: str) -> None:
    meter = await start_meter(upstream.url)
    await clear_ws_log(upstream.url)
    headers = {**AUTH, "x-fake-deltas": "200", "x-fake-chunk-delay-ms": "20"}
    ws = await ws_connect(ws_url(meter.url), additional_headers=headers)
    await ws.send(create(metadata={"fake_usage": USAGE_A}))
    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "response.output_text.delta":
        pass
    # The upstream's side of the socket ends within a second of the hang-up.
    assert await hang_up(ws, how, upstream.url) < 1.0
    [row] = await meter.rows()
    assert row["outcome"] == "client_disconnected" and row["transport"] == "websocket"
    assert row["response_id"] is not None and row["input_tokens"] is None  # the terminal event never came
    assert row["ttft_ms"] is not None


@pytest.mark.parametrize("how", ["close", "drop"])
async def test_client_hangs_up_after_the_output_and_the_usage_is_still_recorded(upstream, start_meter, how: str) -> None:
    # The client has the whole answer once the output's last `.done` event is in, and
    # the provider bills it: meter reads on, relaying nothing, for the terminal event's
    # usage, as over HTTP (SPEC §2), then closes the upstream's side.
    meter = await start_meter(upstream.url)
    await clear_ws_log(upstream.url)
    usage = {"input_tokens": 900, "output_tokens": 300}
    ws = await ws_connect(ws_url(meter.url), additional_headers={**AUTH, "x-fake-deltas": "5", "x-fake-chunk-delay-ms": "150"})
    await ws.send(create(metadata={"fake_usage": usage}))
    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "response.output_item.done":
        pass
    assert await hang_up(ws, how, upstream.url) < 2.5
    [row] = await meter.rows()
    assert row["outcome"] == "client_disconnected" and row["transport"] == "websocket"
    assert (row["input_tokens"], row["output_tokens"]) == (900, 300)
    assert row["cost_usd"] is not None


async def test_reading_on_after_a_hang_up_gives_up_after_two_seconds(upstream, start_meter) -> None:
    # The upstream sends the output's `.done` events and then nothing: meter reads on for
    # the terminal event no longer than over HTTP (2 s), then closes the upstream's side;
    # the row is the client's hang-up, without usage.
    meter = await start_meter(upstream.url)
    await clear_ws_log(upstream.url)
    ws = await ws_connect(ws_url(meter.url), additional_headers={**AUTH, "x-fake-deltas": "3"})
    await ws.send(create(metadata={"fake_action": "stall-terminal"}))
    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "response.output_item.done":
        pass
    waited = await hang_up(ws, "close", upstream.url)
    assert 1.5 < waited < 3.5, waited
    [row] = await meter.rows()
    assert row["outcome"] == "client_disconnected" and row["input_tokens"] is None


@pytest.mark.parametrize("action,code,reason", [("drop", 1011, None), ("close", 1011, "fake close")])
async def test_upstream_ends_mid_response(upstream, start_meter, action: str, code: int, reason: str | None) -> None:
    meter = await start_meter(upstream.url)
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        await ws.send(create(metadata={"fake_action": action}))
        received = []
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert received and received[0]["type"] == "response.created"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    if reason is not None:
        assert closed.value.rcvd.reason == reason
    [row] = await meter.rows()
    assert row["outcome"] == "error" and row["error_type"] == "upstream_disconnected"
    assert row["response_id"] == received[0]["response"]["id"] and row["input_tokens"] is None


async def test_error_event_recorded_and_socket_continues(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        await ws.send(create(metadata={"fake_action": "error"}, stream_id="lane-1"))
        [error] = await until_terminal(ws)
        assert error["type"] == "error" and error["stream_id"] == "lane-1"
        await ws.send(create(metadata={"fake_usage": USAGE_B}))
        events = await until_terminal(ws)
    failed, ok = await meter.rows()
    assert failed["outcome"] == "failed" and failed["transport"] == "websocket"  # as an SSE `error` event (SPEC §2a)
    assert (failed["error_type"], failed["error_code"]) == ("invalid_request_error", "bad_thing")
    assert failed["response_id"] is None and failed["input_tokens"] is None
    assert ok["outcome"] == "completed" and ok["response_id"] == events[-1]["response"]["id"]
    assert usage_of(ok) == expected_usage(USAGE_B)


async def test_lanes_by_stream_id(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    lanes = {"a": USAGE_A, "b": USAGE_B, "c": {**USAGE_B, "input_tokens": 99}}
    async with ws_connect(ws_url(meter.url), additional_headers={**AUTH, "x-fake-deltas": "3"}) as ws:
        for lane, usage in lanes.items():
            await ws.send(create(stream_id=lane, metadata={"fake_usage": usage}))
        finals = {}
        while len(finals) < len(lanes):
            event = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if event["type"] == "response.completed":
                finals[event["stream_id"]] = event["response"]["id"]
    rows = {r["response_id"]: r for r in await meter.rows()}
    assert len(rows) == 3
    for lane, usage in lanes.items():
        assert usage_of(rows[finals[lane]]) == expected_usage(usage)


async def test_shutdown_lets_the_running_response_finish_then_closes(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, shutdown_grace=10)
    relay = meter.meter.proxy.websocket.__self__  # the server's WebSocketRelay
    async with ws_connect(ws_url(meter.url), additional_headers={**AUTH, "x-fake-deltas": "20", "x-fake-chunk-delay-ms": "20"}) as busy, ws_connect(
        ws_url(meter.url), additional_headers=AUTH
    ) as idle:
        await busy.send(create(metadata={"fake_usage": USAGE_A}))
        assert json.loads(await busy.recv())["type"] == "response.created"
        t0 = time.monotonic()
        relay.shutdown()
        stopping = asyncio.create_task(meter.stop())
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(idle.recv(), 2)
        assert idle.close_code == 1001
        events = []
        with pytest.raises(websockets.ConnectionClosedOK):
            while True:
                events.append(json.loads(await asyncio.wait_for(busy.recv(), 5)))
        assert events[-1]["type"] == "response.completed" and busy.close_code == 1001
        await asyncio.wait_for(stopping, 5)
        assert time.monotonic() - t0 < 5  # not the whole grace period
    [row] = ledger_rows(meter.ledger_path)
    assert row["outcome"] == "completed" and usage_of(row) == expected_usage(USAGE_A)


async def test_stop_closes_idle_sockets_without_waiting_for_the_grace_period(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, shutdown_grace=1.5)
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        t0 = time.monotonic()
        await meter.stop()
        assert time.monotonic() - t0 < 1
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 1)
        assert ws.close_code == 1001


async def test_a_response_past_the_grace_period_is_closed_1001_and_recorded(upstream, meter_process, tmp_path) -> None:
    # SIGTERM with two responses that outlast --shutdown-grace: when the grace ends the
    # client gets meter's close frame (1001, as an idle socket does), within a second,
    # not a dropped connection two seconds later; each response is its row.
    ledger = tmp_path / "l.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--shutdown-grace", "1")
    headers = {**AUTH, "x-fake-deltas": "400", "x-fake-chunk-delay-ms": "50"}  # 20 s each
    async with ws_connect(ws_url(meter.url), additional_headers=headers) as ws:
        await ws.send(create(stream_id="a"))
        await ws.send(create(stream_id="b"))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "response.created"
        t0 = time.monotonic()
        meter.signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        cut = time.monotonic() - t0
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
    assert 1 <= cut < 2, f"the socket ended {cut:.1f} s after SIGTERM, with a grace of 1 s"
    assert await asyncio.get_running_loop().run_in_executor(None, meter.wait) == 0
    rows = ledger_rows(ledger)
    assert len(rows) == 2 and all(r["response_id"] for r in rows)
    assert {(r["outcome"], r["error_type"], r["error_code"]) for r in rows} == {("error", "meter_proxy_error", "shutting_down")}


async def test_a_client_that_drops_during_the_grace_period_is_recorded_as_its_own_hang_up(upstream, meter_process, tmp_path) -> None:
    # meter is draining (SIGTERM, 10 s of grace) when the client drops its socket: that is
    # the client's hang-up, as over HTTP, not a response cut by the shutdown, which only
    # what is still open when the grace period ends is.
    ledger = tmp_path / "l.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--shutdown-grace", "10")
    ws = await ws_connect(ws_url(meter.url), additional_headers={**AUTH, "x-fake-deltas": "400", "x-fake-chunk-delay-ms": "50"})
    await ws.send(create())
    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "response.output_text.delta":
        pass
    meter.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)  # draining now
    ws.transport.abort()
    assert await asyncio.get_running_loop().run_in_executor(None, meter.wait) == 0
    [row] = ledger_rows(ledger)
    assert (row["outcome"], row["error_type"], row["error_code"]) == ("client_disconnected", None, None)


# --- refused and unreachable --------------------------------------------------------


async def refused(url: str, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
    try:
        async with ws_connect(url, additional_headers=headers):
            pass
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, exc.response.body, exc.response.headers.get("Content-Type")
    raise AssertionError("the upgrade was accepted")


async def test_refused_upgrade_relays_status_and_body(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    headers = {**AUTH, "x-fake-ws-refuse": "401"}
    through = await refused(ws_url(meter.url), headers)
    direct = await refused(ws_url(upstream.url), headers)
    assert through == direct and through[0] == 401
    assert json.loads(through[1])["error"]["code"] == "invalid_api_key"
    # The SDK sees the same refusal.
    with pytest.raises(Exception) as sdk_error:
        async with sdk(meter.url).responses.connect(extra_headers={"x-fake-ws-refuse": "401"}, max_retries=0):
            pass
    assert "401" in str(sdk_error.value) or getattr(getattr(sdk_error.value, "response", None), "status_code", None) == 401
    rows = await meter.rows()
    assert len(rows) == 2
    for row in rows:
        assert row["transport"] == "http" and row["status_code"] == 401 and row["outcome"] == "error"
        assert row["endpoint"] == "responses" and row["error_code"] == "invalid_api_key"
        assert row["response_bytes"] == len(through[1])


async def test_upstream_unreachable_is_502(start_meter) -> None:
    from .conftest import free_port

    meter = await start_meter(f"http://127.0.0.1:{free_port()}")
    status, body, _ = await refused(ws_url(meter.url), AUTH)
    assert status == 502
    assert json.loads(body)["error"]["type"] == "meter_proxy_error"
    [row] = await meter.rows()
    assert row["outcome"] == "upstream_unreachable" and row["status_code"] == 502 and row["transport"] == "http"


# --- load ------------------------------------------------------------------------------


async def test_200_sockets_times_5_responses_counted_once(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    sockets, per_socket = 200, 5
    sent: list[dict[str, int]] = []
    seen_ids: list[str] = []
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        async with session.ws_connect(ws_url(meter.url), headers={**AUTH, "x-fake-deltas": "3"}) as ws:
            for j in range(per_socket):
                usage = {"input_tokens": rng.randint(1, 5000), "output_tokens": rng.randint(1, 500), "cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0}
                sent.append(usage)
                await ws.send_str(create(metadata={"fake_usage": usage}))
                while True:
                    event = json.loads(await asyncio.wait_for(ws.receive_str(), 30))
                    if event["type"] == "response.completed":
                        seen_ids.append(event["response"]["id"])
                        assert event["response"]["usage"]["input_tokens"] == usage["input_tokens"]
                        break

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(sockets)))
    rows = await meter.rows("transport = 'websocket'")
    assert len(rows) == sockets * per_socket == len(set(seen_ids))
    assert {r["response_id"] for r in rows} == set(seen_ids)
    assert all(r["outcome"] == "completed" and r["input_tokens"] is not None for r in rows)
    assert sum(r["input_tokens"] for r in rows) == sum(u["input_tokens"] for u in sent)
    assert sum(r["output_tokens"] for r in rows) == sum(u["output_tokens"] for u in sent)
    assert sum(r["total_tokens"] for r in rows) == sum(u["input_tokens"] + u["output_tokens"] for u in sent)


async def test_connections_gauge_moves(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)

    async def gauge() -> float:
        async with aiohttp.ClientSession() as s, s.get(meter.admin_url + "/metrics") as r:
            text = await r.text()
        m = re.search(r"^meter_websocket_connections (\S+)$", text, re.MULTILINE)
        assert m, "meter_websocket_connections is not exported"
        return float(m.group(1))

    assert await gauge() == 0
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH), ws_connect(ws_url(meter.url), additional_headers=AUTH):
        assert await gauge() == 2
    deadline = time.monotonic() + 3
    while await gauge() != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await gauge() == 0


# --- lanes, successors and layouts the fake does not produce: meter's own metering
# state fed the upstream's messages in an order a real server may send them --------


class Collect:
    def __init__(self) -> None:
        self.started: list[Flow] = []
        self.records: list[Any] = []

    def request(self, flow: Flow) -> None:
        self.started.append(flow)

    def done(self, flow: Flow, record: Any) -> None:
        self.records.append(record)


def socket_meter(identities: KeyIdentities | None = None) -> tuple[SocketMeter, Collect]:
    sink = Collect()
    relay = WebSocketRelay("http://upstream.invalid", None, Addons([sink]), identities or KeyIdentities())  # type: ignore[arg-type]
    template = Flow(method="GET", path="/v1/responses", endpoint="responses", headers={"Authorization": f"Bearer {SECRET_KEY}"}, transport="websocket")
    return SocketMeter(relay, template, None, None), sink


def event(kind: str, lane: str | None = None, **fields: Any) -> bytes:
    obj = {"type": kind, "sequence_number": 1, **fields}
    if lane is not None:
        obj["stream_id"] = lane
    return json.dumps(obj, separators=(",", ":")).encode()


def response(rid: str, status: str = "in_progress", usage: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    obj = {"id": rid, "object": "response", "status": status, "model": "gpt-4o-2024-08-06", "service_tier": "auto" if status == "in_progress" else "default", **extra}
    if usage is not None:
        obj["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"], "total_tokens": usage["input_tokens"] + usage["output_tokens"]}
    return obj


def test_interleaved_lanes_are_attributed_by_stream_id() -> None:
    m, sink = socket_meter()
    m.on_client(create(stream_id="a", model="gpt-4o").encode())
    m.on_client(create(stream_id="b", model="gpt-5").encode())
    sent: dict[str, int] = {"a": 0, "b": 0}
    for lane, message in [
        ("a", event("response.created", "a", response=response("resp_a"))),
        ("b", event("response.created", "b", response=response("resp_b"))),
        ("b", event("response.output_text.delta", "b", delta="x" * 100)),
        ("a", event("response.output_text.delta", "a", delta="y")),
        ("b", event("response.output_text.delta", "b", delta="x" * 7)),
        ("b", event("response.completed", "b", response=response("resp_b", "completed", {"input_tokens": 2, "output_tokens": 1}))),
        # "a" is now the only response on the socket: its deltas take the fast path.
        ("a", event("response.output_text.delta", "a", delta="z")),
        ("a", event("response.reasoning_summary_text.delta", "a", delta="zz")),
        ("a", event("response.output_item.done", "a", item={"id": "msg_1"})),
        ("a", event("response.completed", "a", response=response("resp_a", "completed", {"input_tokens": 5, "output_tokens": 4}))),
    ]:
        m.on_upstream(message)
        sent[lane] += len(message)
    b, a = sink.records
    assert (a.response_bytes, b.response_bytes) == (sent["a"], sent["b"])
    assert (a.response_id, a.model_requested, a.input_tokens, a.output_tokens) == ("resp_a", "gpt-4o", 5, 4)
    assert (b.response_id, b.model_requested, b.input_tokens, b.output_tokens) == ("resp_b", "gpt-5", 2, 1)
    assert a.ttft_ms is not None and b.ttft_ms is not None and b.response_bytes > 100
    assert a.transport == b.transport == "websocket" and a.stream and b.stream
    assert not m.open and not m.pending  # nothing kept once the responses ended


def test_steered_response_and_its_automatic_successor() -> None:
    m, sink = socket_meter()
    m.on_client(create(model="gpt-5", service_tier="priority", metadata={"team": "x"}).encode())
    m.on_upstream(event("response.created", response=response("resp_1")))
    m.on_upstream(event("response.output_text.delta", delta="a"))
    m.on_client(b'{"type":"response.steer","previous_response_id":"resp_1","input":"also this"}')
    m.on_upstream(b'{"type":"response.steer.accepted","sequence_number":2}')
    m.on_upstream(event("response.incomplete", response=response("resp_1", "incomplete", {"input_tokens": 10, "output_tokens": 2}, incomplete_details={"reason": "steered"})))
    time.sleep(0.01)
    m.on_upstream(event("response.created", response=response("resp_2", previous_response_id="resp_1")))
    m.on_upstream(event("response.output_text.delta", delta="b"))
    m.on_upstream(event("response.completed", response=response("resp_2", "completed", {"input_tokens": 30, "output_tokens": 5}, previous_response_id="resp_1")))
    steered, successor = sink.records
    assert steered.outcome == "incomplete" and (steered.input_tokens, steered.output_tokens) == (10, 2)
    assert successor.outcome == "completed" and (successor.input_tokens, successor.output_tokens) == (30, 5)
    assert successor.previous_response_id == "resp_1"
    # The successor inherits its predecessor's settings, and its clock starts at the predecessor's end.
    assert (successor.model_requested, successor.service_tier_requested, successor.tags) == ("gpt-5", "priority", steered.tags)
    assert successor.started_at == pytest.approx(steered.finished_at, abs=1e-6)
    assert successor.duration_ms >= 10
    assert len(sink.started) == 2


def test_warmup_usage_is_null_even_when_reported_as_zeros() -> None:
    m, sink = socket_meter()
    m.on_client(create(generate=False).encode())
    m.on_upstream(event("response.created", response=response("resp_w")))
    m.on_upstream(event("response.completed", response=response("resp_w", "completed", {"input_tokens": 0, "output_tokens": 0})))
    [rec] = sink.records
    assert rec.outcome == "completed" and rec.response_id == "resp_w"
    assert (rec.input_tokens, rec.output_tokens, rec.total_tokens) == (None, None, None)


def test_error_before_created_ends_the_waiting_request() -> None:
    m, sink = socket_meter()
    m.on_client(create().encode())
    m.on_upstream(b'{"type":"error","error":{"type":"invalid_request_error","code":"previous_response_not_found","message":"nope"}}')
    [rec] = sink.records
    assert (rec.outcome, rec.error_type, rec.error_code) == ("failed", "invalid_request_error", "previous_response_not_found")
    m.on_upstream(b'{"type":"error","error":{"type":"invalid_request_error","code":"invalid_json"}}')
    assert len(sink.records) == 1  # an error about no response is no row


def test_error_mid_response_ends_it_once() -> None:
    m, sink = socket_meter()
    m.on_client(create(stream_id="l").encode())
    m.on_upstream(event("response.created", "l", response=response("resp_e")))
    m.on_upstream(b'{"type":"error","stream_id":"l","sequence_number":3,"error":{"type":"server_error","code":"overloaded","message":"try again"}}')
    m.on_upstream(event("response.failed", "l", response=response("resp_e", "failed", {"input_tokens": 3, "output_tokens": 0})))
    [rec] = sink.records
    assert (rec.response_id, rec.outcome, rec.error_type, rec.error_code) == ("resp_e", "failed", "server_error", "overloaded")
    assert m.idle


def test_an_unattributed_error_mid_response_ends_nothing() -> None:
    # An error naming no lane answers something the client sent; the running
    # response goes on, and its terminal event carries the usage (SPEC §2b).
    m, sink = socket_meter()
    m.on_client(create().encode())
    m.on_upstream(event("response.created", response=response("resp_e")))
    m.on_upstream(b'{"type":"error","error":{"type":"invalid_request_error","code":"unknown_event_type","message":"?"}}')
    assert not sink.records
    m.on_upstream(event("response.completed", response=response("resp_e", "completed", {"input_tokens": 3, "output_tokens": 2})))
    [rec] = sink.records
    assert (rec.response_id, rec.outcome, rec.input_tokens, rec.output_tokens) == ("resp_e", "completed", 3, 2)
    assert m.idle


def test_nested_response_create_form() -> None:
    m, sink = socket_meter()
    m.on_client(json.dumps({"type": "response.create", "stream_id": "n", "response": {"model": "gpt-5", "service_tier": "flex", "input": "hi"}}).encode())
    m.on_upstream(event("response.created", "n", response=response("resp_n")))
    m.on_upstream(event("response.completed", "n", response=response("resp_n", "completed", {"input_tokens": 1, "output_tokens": 1})))
    [rec] = sink.records
    assert (rec.model_requested, rec.service_tier_requested, rec.input_tokens) == ("gpt-5", "flex", 1)


def test_socket_end_closes_what_is_in_flight() -> None:
    m, sink = socket_meter()
    m.on_client(create(stream_id="a").encode())
    m.on_client(create(stream_id="b").encode())
    m.on_upstream(event("response.created", "a", response=response("resp_a")))
    m.end("error", "upstream_disconnected", "1006")
    assert [(r.response_id, r.outcome, r.error_code) for r in sink.records] == [("resp_a", "error", "1006"), (None, "error", "1006")]
    assert not m.open and not m.pending


def test_output_finished_once_every_response_has_sent_its_last_done_event() -> None:
    # What decides reading on after a hang-up: each response's last event a `.done` one
    # (fast path or not, on either lane), no delta after it, no create waiting.
    m, _ = socket_meter()
    assert not m.output_finished  # nothing in flight
    m.on_client(create(stream_id="a").encode())
    m.on_client(create(stream_id="b").encode())
    m.on_upstream(event("response.created", "a", response=response("resp_a")))
    m.on_upstream(event("response.output_text.delta", "a", delta="x"))
    m.on_upstream(event("response.output_item.done", "a", item={"type": "message"}))
    assert not m.output_finished  # "b" asked, not started: it would start generating
    m.on_upstream(event("response.created", "b", response=response("resp_b")))
    m.on_upstream(event("response.output_text.delta", "b", delta="y"))
    assert not m.output_finished  # "b" is generating
    m.on_upstream(event("response.output_text.done", "b", text="y"))
    assert m.output_finished
    m.on_upstream(event("response.output_item.added", "b", item={"type": "message"}))
    assert not m.output_finished  # something came after "b"'s `.done`: more output may follow
    m.on_upstream(event("response.completed", "b", response=response("resp_b", "completed", {"input_tokens": 2, "output_tokens": 1})))
    m.on_upstream(event("response.output_text.delta", "a", delta="z"))  # "a" alone now: the fast path
    assert not m.output_finished
    m.on_upstream(event("response.content_part.done", "a", part={"type": "output_text"}))
    assert m.output_finished and m.client_left()
    m.on_upstream(event("response.completed", "a", response=response("resp_a", "completed", {"input_tokens": 5, "output_tokens": 3})))
    assert m.idle and not m.done_at


class ClosedTransport:
    """The client's transport once its connection has ended: every write is refused."""

    def is_closing(self) -> bool:
        return True

    def writelines(self, parts: Any) -> None:  # pragma: no cover - never reached
        raise AssertionError("written to a closed transport")


class ScriptedUpstreamSocket:
    """The upstream side of a socket, as the relay's pump reads it: the messages given,
    then nothing (the upstream says no more); every close asked of it, kept."""

    def __init__(self, *texts: bytes) -> None:
        self.messages = [aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, t, None) for t in texts]
        self.closes: list[dict[str, Any]] = []
        self.close_code = None

    async def receive(self) -> aiohttp.WSMessage:
        if self.messages:
            return self.messages.pop(0)
        await asyncio.sleep(30)
        raise AssertionError("read past the script")

    async def close(self, **close: Any) -> bool:
        self.closes.append(close)
        return True


async def test_a_terminal_event_the_pump_cannot_write_is_still_metered_and_read_on() -> None:
    # The client's connection ended just as the upstream's terminal event arrived: the
    # pump's write fails before the client's pump has seen the hang-up.  The event was
    # written before it was metered, so its usage was lost, and the pump closed the
    # upstream at once, skipping the read-on that keeps the usage the provider bills.
    from meter.websocket import _ClientFrames, _Socket

    m, sink = socket_meter()
    m.on_client(create().encode())
    m.on_upstream(event("response.created", response=response("resp_r")))
    m.on_upstream(event("response.output_text.delta", delta="x"))
    usage = {"input_tokens": 900, "output_tokens": 300}
    upstream = ScriptedUpstreamSocket(
        event("response.output_item.done", item={"type": "message"}),
        event("response.completed", response=response("resp_r", "completed", usage)),
    )
    frames = _ClientFrames(types.SimpleNamespace(transport=ClosedTransport(), protocol=types.SimpleNamespace(_paused=False)))  # type: ignore[arg-type]
    socket = _Socket()
    await asyncio.wait_for(m.relay._upstream_to_client(upstream, types.SimpleNamespace(exception=lambda: None), frames, m, socket), 5)  # type: ignore[attr-defined,arg-type]
    [record] = sink.records
    assert (record.response_id, record.input_tokens, record.output_tokens) == ("resp_r", 900, 300)
    assert socket.closed_by == "client" and upstream.closes == [{"code": 1001}] and m.idle


def test_messages_not_led_by_type_are_still_metered() -> None:
    m, sink = socket_meter()
    m.on_client(b'{"model": "gpt-4o", "type": "response.create", "input": "hi"}')
    m.on_upstream(json.dumps({"response": response("resp_x"), "type": "response.created"}).encode())
    m.on_upstream(json.dumps({"delta": "x", "type": "response.output_text.delta"}).encode())
    m.on_upstream(json.dumps({"response": response("resp_x", "completed", {"input_tokens": 4, "output_tokens": 2}), "type": "response.completed"}).encode())
    [rec] = sink.records
    assert (rec.response_id, rec.input_tokens, rec.output_tokens, rec.model_requested) == ("resp_x", 4, 2, "gpt-4o")
    assert rec.ttft_ms is not None


def test_state_stays_bounded_over_thousands_of_responses() -> None:
    m, sink = socket_meter()
    for i in range(5000):
        lane = f"lane-{i}"  # a fresh lane each time: the worst case for per-lane memory
        m.on_client(create(stream_id=lane).encode())
        m.on_upstream(event("response.created", lane, response=response(f"resp_{i}")))
        m.on_upstream(event("response.output_text.delta", lane, delta="x"))
        m.on_upstream(event("response.completed", lane, response=response(f"resp_{i}", "completed", {"input_tokens": 1, "output_tokens": 1})))
    assert len(sink.records) == 5000
    assert m.idle and not m.orphans
    assert len(m.last) <= 256 and len(m.ended) <= 256


def test_an_error_event_fails_the_response_on_either_transport() -> None:
    # One interpreter: the same `error` event ends a response the same way over SSE and a WebSocket.
    error = b'{"type":"error","sequence_number":3,"error":{"type":"server_error","code":"overloaded","message":"try again"}}'
    sse = SSEObserver("responses")
    sse.feed(b"event: error\ndata: " + error + b"\n\n")
    flow = Flow(method="POST", path="/v1/responses", endpoint="responses", headers={})
    flow.status_code, flow.request_body, flow.observation = 200, b'{"stream":true}', sse.finish()
    http = build_record(flow, KeyIdentities())
    m, sink = socket_meter()
    m.on_client(create().encode())
    m.on_upstream(error)
    [ws] = sink.records
    assert (http.outcome, http.error_type, http.error_code) == (ws.outcome, ws.error_type, ws.error_code) == ("failed", "server_error", "overloaded")


class _Unbuildable(KeyIdentities):
    """Identities that fail: the record of a request that carries a key cannot be built."""

    def lookup(self, key: str) -> tuple[str, str, str | None]:
        raise RuntimeError("no record today")


def test_a_record_that_cannot_be_built_still_gives_its_row() -> None:
    # As over HTTP: the row of what is certain (timing, sizes, outcome), never none.
    m, sink = socket_meter(_Unbuildable())
    m.on_client(create(stream_id="l").encode())
    m.on_upstream(event("response.created", "l", response=response("resp_u")))
    m.on_upstream(event("response.completed", "l", response=response("resp_u", "completed", {"input_tokens": 1, "output_tokens": 1})))
    [rec] = sink.records
    assert (rec.transport, rec.outcome, rec.error_type, rec.input_tokens) == ("websocket", "completed", "meter_record_error", None)
    assert rec.response_bytes > 0 and rec.duration_ms >= 0
    assert m.idle


def test_the_fast_path_never_skips_an_event_the_interpreter_decodes() -> None:
    # The per-message fast path counts deltas (`{"type":"response.output_text.delta"…`)
    # without reading them: no event type the Responses interpreter decodes may start so.
    from meter.observe.responses import DECODED
    from meter.observe.socket import _DELTA_HEADS, _DONE_HEADS

    heads = _DELTA_HEADS + _DONE_HEADS
    assert not [t for t in DECODED for prefix in heads if (b'{"type":"' + t + b'"').startswith(prefix)]


# --- the handshake against a gateway ---------------------------------------------------


async def test_an_upstream_with_userinfo_takes_the_clients_authorization(upstream, start_meter) -> None:
    """`--upstream http://user:password@gateway`, as over HTTP: a handshake with its own
    Authorization goes with it, as sent (aiohttp refuses to send both, which made every
    keyed handshake a 502)."""
    meter = await start_meter(upstream.url.replace("http://", "http://gw:s3cret@"))
    async with ws_connect(ws_url(meter.url), additional_headers=AUTH) as ws:
        await ws.send(create())
        events = await until_terminal(ws)
    assert events[-1]["type"] == "response.completed"
    [row] = await meter.rows()
    assert (row["transport"], row["outcome"], row["status_code"]) == ("websocket", "completed", 101)


async def test_a_refused_upgrade_keeps_the_upstreams_reason_and_adds_no_field(start_meter) -> None:
    """The refusal the client gets is the upstream's head: its reason phrase, and no
    `Server` or `Content-Type` of aiohttp's own."""
    from .socket_server import SocketServer

    class Refusing(SocketServer):
        async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 403 Nope Not Here\r\nContent-Length: 2\r\nX-Why: policy\r\n\r\nno")
            await writer.drain()
            writer.close()

    async with Refusing() as refusing:
        meter = await start_meter(refusing.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", meter.meter.proxy_address[1])
        writer.write(
            b"GET /v1/responses HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    status_line, *fields = answer[:-4].split(b"\r\n")
    names = {line.split(b":", 1)[0].lower() for line in fields}
    assert status_line == b"HTTP/1.1 403 Nope Not Here"
    assert b"x-why" in names and not names & {b"server", b"content-type"}, answer
