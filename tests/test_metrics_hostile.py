"""Metric labels no client can blow up, and the counters of what was not metered (SPEC §2b, §6).

Every label value that comes from outside (`key`, `model`, `service_tier`) is
bounded in number and in length, and a new value is admitted into the bounded
set only from a request the upstream answered 2xx: a client without a valid
key gets a 401 from the upstream and so can never use up the label budget.

Traffic is sent with raw sockets to a real meter in front of the fake provider
process (`x-fake-scenario: status:401` makes it refuse a request as the real
API refuses an unknown key).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect as ws_connect

from meter.flow import Flow
from meter.identity import key_id
from meter.ledger import LedgerStats
from meter.metrics import MAX_LABEL_CHARS, MAX_SCRAPED_LABELS, MAX_TIERS, MAX_UNMETERED_REASONS, Metrics
from meter.observe import Observation
from meter.record import Record

from .socket_server import SocketServer
from .test_metrics import Scrape, parse, scrape

REFUSED = {"x-fake-scenario": "status:401"}


async def send(url: str, body: Any, headers: dict[str, str] | None = None, path: str = "/v1/responses") -> int:
    """POST `body` (JSON) over a raw socket; returns the status once the whole answer was read."""
    host, _, port = url.removeprefix("http://").partition(":")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json", f"Content-Length: {len(data)}"]
    head.append("Connection: close")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    status_line = answer.split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def usage(**u: int) -> dict[str, str]:
    return {"x-fake-usage": json.dumps(u)}


async def scrape_until(admin_url: str, requests: int, timeout: float = 20.0) -> Scrape:
    """Scrape once `meter_requests_total` counts `requests` (a record is made just after the answer ends)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(admin_url)
        if m.value("meter_requests_total") >= requests or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.05)


def longest_label_value(m: Scrape) -> int:
    return max((len(v) for _, labels, _ in m.samples for v in labels.values()), default=0)


# --- admission: only from 2xx --------------------------------------------------------


async def test_refused_requests_do_not_use_up_the_label_budget(upstream, start_meter) -> None:
    max_keys = 3
    meter = await start_meter(upstream.url, metrics_max_keys=max_keys)
    # Anyone can send garbage keys and model names; the upstream refuses them.
    garbage = [(f"sk-garbage-{i:03d}-xxxxxxxxxxxxxxxx", f"garbage-model-{i:03d}") for i in range(40)]
    for key, model in garbage:
        assert await send(meter.url, {"model": model, "input": "x"}, {**bearer(key), **REFUSED}) == 401
    # A model seen first on a refused request, before any 2xx named it.
    assert await send(meter.url, {"model": "acme-late", "input": "x"}, {**bearer("sk-real-0-aaaaaaaaaaaaaaaa"), **REFUSED}) == 401
    # Then real traffic: each key and model the upstream accepted is its own label.
    real = [(f"sk-real-{j}-aaaaaaaaaaaaaaaa", f"acme-real-{j}") for j in range(max_keys)]
    for key, model in real:
        assert await send(meter.url, {"model": model, "input": "x"}, {**bearer(key), **usage(input_tokens=7, output_tokens=3)}) == 200
    late = {**bearer(real[0][0]), **usage(input_tokens=1, output_tokens=1)}
    assert await send(meter.url, {"model": "acme-late", "input": "x"}, late) == 200
    # Once admitted, a value counts as itself whatever the status.
    assert await send(meter.url, {"model": "acme-real-1", "input": "x"}, {**bearer(real[1][0]), "x-fake-scenario": "status:429"}) == 429
    assert await send(meter.url, {"model": "acme-late", "input": "x"}, {**bearer(real[0][0]), **REFUSED}) == 401

    m = await scrape_until(meter.admin_url, len(garbage) + 1 + len(real) + 3)
    assert m.value("meter_requests_total") == len(garbage) + 1 + len(real) + 3
    for key, model in garbage:
        assert model not in m.text and key_id(key) not in m.text
    refused = m.select("meter_requests_total", status_code="401")
    assert {l["key"] for l, _ in refused} == {"other", key_id(real[0][0])}
    assert {l["model"] for l, _ in refused} == {"other", "acme-late"}
    # The first acme-late (refused before key and model were admitted) counted as other, the second as itself.
    assert m.value("meter_requests_total", status_code="401", key="other", model="other") == len(garbage) + 1
    assert m.value("meter_requests_total", status_code="401", model="acme-late", key=key_id(real[0][0])) == 1
    by_key = m.by("meter_requests_total", "key", status_code="200")
    assert by_key == {key_id(k): (2 if k == real[0][0] else 1) for k, _ in real}, by_key
    assert m.by("meter_tokens_total", "model", type="input") == {"acme-real-0": 7, "acme-real-1": 7, "acme-real-2": 7, "acme-late": 1}
    assert m.value("meter_requests_total", status_code="429", model="acme-real-1", key=key_id(real[1][0])) == 1


async def test_websocket_responses_admit_their_labels(upstream, start_meter) -> None:
    """Every WebSocket response carries the handshake's 101: one the upstream created is accepted."""
    meter = await start_meter(upstream.url, metrics_max_keys=2)
    key = "sk-ws-aaaaaaaaaaaaaaaa"
    url = "ws" + meter.url.removeprefix("http") + "/v1/responses"
    async with ws_connect(url, additional_headers=bearer(key)) as ws:
        for model in ("acme-ws-a", "acme-ws-b"):
            await ws.send(json.dumps({"type": "response.create", "model": model, "input": "hi"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "response.completed":
                pass
    m = await scrape_until(meter.admin_url, 2)
    assert m.by("meter_requests_total", "model", key=key_id(key), status_code="101") == {"acme-ws-a": 1, "acme-ws-b": 1}


# --- length -------------------------------------------------------------------------------


async def test_long_label_values_count_as_other(upstream, meter_process, tmp_path) -> None:
    meter = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"))
    at_limit, past_limit = "m" * MAX_LABEL_CHARS, "m" * (MAX_LABEL_CHARS + 1)
    huge = "x" * (4 << 20)
    # No key at all, a 4 MiB model: the upstream refuses it.
    assert await send(meter.url, {"model": huge, "input": "x"}, REFUSED) == 401
    # A valid request whose (echoed) model is 4 MiB, or one character too long: other too.
    assert await send(meter.url, {"model": huge, "input": "x"}, bearer("sk-real-long-aaaaaaaaaaaaaaaa")) == 200
    assert await send(meter.url, {"model": past_limit, "input": "x"}, bearer("sk-real-long-aaaaaaaaaaaaaaaa")) == 200
    assert await send(meter.url, {"model": at_limit, "input": "x"}, bearer("sk-real-long-aaaaaaaaaaaaaaaa")) == 200
    long_tier = {"model": "gpt-4o", "input": "x", "service_tier": "t" * 200}
    assert await send(meter.url, long_tier, bearer("sk-real-long-aaaaaaaaaaaaaaaa")) == 200

    m = await scrape_until(meter.admin_url, 5)
    assert m.value("meter_requests_total") == 5
    assert len(m.text) < 64 << 10, len(m.text)
    assert longest_label_value(m) == MAX_LABEL_CHARS
    assert m.by("meter_requests_total", "model") == {"other": 3, at_limit: 1, "gpt-4o-2024-08-06": 1}
    assert m.by("meter_requests_total", "service_tier", model="gpt-4o-2024-08-06") == {"other": 1}


# --- service_tier in number -------------------------------------------------------------------


async def test_service_tier_label_bounded(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    n = MAX_TIERS + 24
    for i in range(n):  # the fake provider reports having served the tier asked for, as a hostile upstream may
        body = {"model": "gpt-4o", "input": "x", "service_tier": f"tier-{i:03d}"}
        assert await send(meter.url, body, {**bearer("sk-tiers-aaaaaaaaaaaaaaaa"), **usage(input_tokens=2, output_tokens=1)}) == 200
    # The tiers OpenAI defines stay themselves after the budget is used up.
    for tier in ("flex", "priority", "scale"):
        body = {"model": "gpt-4o", "input": "x", "service_tier": tier}
        assert await send(meter.url, body, {**bearer("sk-tiers-aaaaaaaaaaaaaaaa"), **usage(input_tokens=2, output_tokens=1)}) == 200

    m = await scrape_until(meter.admin_url, n + 3)
    tiers = m.by("meter_requests_total", "service_tier")
    assert sum(tiers.values()) == n + 3
    assert tiers["other"] == n - MAX_TIERS
    assert tiers["flex"] == tiers["priority"] == tiers["scale"] == 1
    assert len([t for t in tiers if t.startswith("tier-")]) == MAX_TIERS
    for name in ("meter_tokens_total", "meter_cost_usd_total"):
        assert m.label_values(name, "service_tier") <= set(tiers), name


# --- the new counters -----------------------------------------------------------------------


async def test_ledger_and_unmetered_families_exported(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    m = await scrape(meter.admin_url)
    for family in ("meter_ledger_rejected_records", "meter_values_truncated", "meter_unmetered_requests", "meter_usage_anomalies"):
        assert m.types.get(family) == "counter", (family, m.types.get(family))
    assert m.value("meter_ledger_rejected_records_total") == 0

    # What the ledger writer thread counts, read at scrape time: records the store refused,
    # values cut to their stored size, numbers past the ledger's types (per endpoint).
    stats = meter.meter.ledger.stats
    stats.rejected = 3
    stats.truncated = {"model": 2, "tags": 5}
    stats.overflows = {"responses": 4}
    # And a usage anomaly counted on the request path, in the same family.
    body = {"model": "gpt-4o", "input": "x"}
    anomaly = usage(input_tokens=10, output_tokens=5, total_tokens=99)
    assert await send(meter.url, body, {**bearer("sk-anomaly-aaaaaaaaaaaaaaaa"), **anomaly}) == 200
    m = await scrape_until(meter.admin_url, 1)
    assert m.value("meter_ledger_rejected_records_total") == 3
    assert m.by("meter_values_truncated_total", "field") == {"model": 2, "tags": 5}
    assert m.by("meter_usage_anomalies_total", "kind", endpoint="responses") == {"total_mismatch": 1, "overflow": 4}
    assert m.text.count("# TYPE meter_usage_anomalies") == 1
    # Read again: what the writer counted is added once, not at every scrape.
    stats.overflows["responses"] += 1
    m = await scrape(meter.admin_url)
    assert m.by("meter_usage_anomalies_total", "kind", endpoint="responses") == {"total_mismatch": 1, "overflow": 5}

    # Field names past the bounds still cannot grow the scrape; nothing counted is lost.
    stats.truncated.update({f"field-{i}": 1 for i in range(500)} | {"f" * 4000: 1})
    stats.truncated["model"] += 1
    m = await scrape(meter.admin_url)
    fields = m.by("meter_values_truncated_total", "field")
    assert len(fields) == MAX_SCRAPED_LABELS + 1
    assert fields["model"] == 3 and fields["tags"] == 5 and fields["field-0"] == 1 and "field-499" not in fields
    assert fields["other"] == 501 - (MAX_SCRAPED_LABELS - 2)
    assert sum(fields.values()) == 2 + 1 + 5 + 501
    assert longest_label_value(m) <= MAX_LABEL_CHARS


def test_unmetered_reasons_bounded() -> None:
    """The reason comes from meter's own observer, a fixed small set; it is bounded all the same."""
    metrics = Metrics(SimpleNamespace(metrics_key_label="on", metrics_max_keys=10))
    reasons = [f"reason-{i}" for i in range(100)] + ["r" * 4000]
    for reason in reasons:
        flow = Flow(method="POST", path="/v1/chat/completions", endpoint="chat.completions", headers={})
        now = time.time()
        record = Record(
            id=None, started_at=now, finished_at=now, method="POST", path=flow.path, endpoint=flow.endpoint, status_code=200,
            error_type="unmetered", error_code=reason,
        )
        metrics.done(flow, record)
    m = parse(metrics.render().decode())
    counted = m.by("meter_unmetered_requests_total", "reason", endpoint="chat.completions")
    assert sum(counted.values()) == len(reasons)
    assert len(counted) == MAX_UNMETERED_REASONS + 1
    assert counted["other"] == len(reasons) - MAX_UNMETERED_REASONS
    assert longest_label_value(m) <= MAX_LABEL_CHARS


class ScriptedUpstream(SocketServer):
    """A raw-socket upstream that answers each request with the bytes `answers` holds
    under the request's `x-answer` header, then closes."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        super().__init__()
        self.answers = answers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
            fields = {name.lower(): value for name, value in fields.items()}
            await reader.readexactly(int(fields.get("content-length", "0")))
            writer.write(self.answers[fields["x-answer"]])
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def raw_answer(status: str, content_type: str, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_unmetered_metric_counts_what_the_report_counts(start_meter) -> None:
    """The metric and the report's `unmetered_requests` count the same rows (SPEC §2b):
    only a model call answered 2xx without usage meter could read is unmetered, not an
    error answered in HTML, nor a cancel or a delete, which carry no usage anyway."""
    html = b"<html><body>busy</body></html>"
    answers = {
        "error-html": raw_answer("400 Bad Request", "text/html", html),
        "cancel-html": raw_answer("200 OK", "text/html", html),
        "delete-weird": raw_answer("200 OK", "application/json", b"\x00\x01garbled", "Content-Encoding: x-weird"),
        "call-html": raw_answer("200 OK", "text/html", html),
    }
    calls = [
        ("POST", "/v1/responses", "error-html"),
        ("POST", "/v1/responses/resp_1/cancel", "cancel-html"),
        ("DELETE", "/v1/responses/resp_1", "delete-weird"),
        ("POST", "/v1/responses", "call-html"),
    ]
    async with ScriptedUpstream(answers) as scripted:
        meter = await start_meter(scripted.url)
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            for method, path, answer in calls:
                headers = {**bearer("sk-unmetered-aaaaaaaaaaaaaaaa"), "x-answer": answer}
                async with s.request(method, meter.url + path, json={"model": "gpt-4o", "input": "x"}, headers=headers) as r:
                    await r.read()
        rows = await meter.rows()
    assert len(rows) == len(calls)
    recorded = Counter((r["endpoint"], r["error_code"]) for r in rows if r["error_type"] == "unmetered")
    assert recorded == {("responses", "unknown_content_type"): 1}
    m = await scrape(meter.admin_url)
    counted = {(labels["endpoint"], labels["reason"]): n for name, labels, n in m.samples if name == "meter_unmetered_requests_total"}
    assert counted == recorded


# --- end to end, once the observer and the ledger report them -----------------------------------


@pytest.mark.skipif("unmetered" not in Observation.__dataclass_fields__, reason="the observer does not report unmetered calls yet")
async def test_chat_stream_without_include_usage_is_counted_unmetered(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert await send(meter.url, body, bearer("sk-chat-aaaaaaaaaaaaaaaa"), path="/v1/chat/completions") == 200
    m = await scrape_until(meter.admin_url, 1)
    assert m.by("meter_unmetered_requests_total", "reason", endpoint="chat.completions") == {"no_include_usage": 1}


@pytest.mark.skipif("overflows" not in LedgerStats.__dataclass_fields__, reason="the ledger writer does not count overflows yet")
async def test_overflowing_tokens_are_a_usage_anomaly(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    body = {"model": "gpt-4o", "input": "x"}
    assert await send(meter.url, body, {**bearer("sk-overflow-aaaaaaaaaaaaaaaa"), **usage(input_tokens=2**63, output_tokens=1)}) == 200
    await meter.flush()
    m = await scrape(meter.admin_url)
    assert m.value("meter_usage_anomalies_total", endpoint="responses", kind="overflow") == 1
