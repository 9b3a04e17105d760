"""Canary keys: a real `meter serve` is sent requests that carry unique raw API keys in
every place a client puts one, through the failures that take unusual code paths, and
then everything meter wrote or answered is searched for them.

Each channel has a key of its own (`CANARIES`), so a failure names the channel that
leaked.  A key counts as found when it appears whole, without its last four
characters (the documented `key_hint` shows those four), or as any 12 characters of
its random part.  Searched: the files meter leaves beside the ledger and the spool
(read while it exists), meter's log at debug level with the access log on,
`/metrics`, `/readyz`, the admin API and the console, the spans and metric points
the real OTLP receiver got, the budget webhook's requests, and `meter report` /
`meter sql` / `meter budgets` over the ledger.  The same run checks that every file
and directory meter created (the WAL and DuckDB's spill files included, seen while
they exist) is owner-only although it started under umask 000, and that the admin
token, the collector's header and the webhook's secret path stay out of it too.

Several phases share one meter (start-up is the slow part): ordinary traffic, a
client that hangs up mid-stream, an oversized body, malformed JSON, malformed
requests at the byte level, WebSocket handshakes, an upstream that answers 401 and
quotes the key, an upstream that is down, a ledger whose disk is full (records
spooled), and SIGTERM while a stream is in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self

import aiohttp
import openai
import pytest

from .conftest import ROOT, MeterProcess, UpstreamProcess
from .otlp_receiver import OTLPReceiver
from .test_faults import flaky_mount  # noqa: F401  (fixture)

CHANNELS = (
    "bearer", "bearer_stream", "x_api_key", "api_key", "query", "query_ws",
    "no_scheme", "scheme_glued", "token_scheme", "basic", "bearer_extra", "connection_named",
    "body_field", "metadata_header", "absolute_userinfo", "refused_target", "bad_header_byte",
    "long_header", "hangup", "oversized", "bad_json", "upstream_401", "upstream_down",
    "ws_sdk", "ws_subprotocol", "ws_refused", "spooled", "sigterm",
)  # fmt: skip
CANARIES = {name: f"sk-{name.replace('_', '')}-CANARY{secrets.token_hex(16)}" for name in CHANNELS}
HINT = 4  # key_hint: "sk-..." and the key's last four characters
WINDOW = 12


def key_pieces(key: str) -> list[bytes]:
    random_part = key.split("CANARY", 1)[1]
    pieces = {key, key[:-HINT], *(random_part[i : i + WINDOW] for i in range(len(random_part) - WINDOW + 1))}
    return [p.encode() for p in pieces]


PIECES = {name: key_pieces(key) for name, key in CANARIES.items()}


def leaks(blob: bytes, other_secrets: dict[str, str]) -> list[str]:
    found = [name for name, pieces in PIECES.items() if any(p in blob for p in pieces)]
    return found + [name for name, value in other_secrets.items() if value.encode() in blob]


class SwitchableRelay:
    """A TCP relay in front of the fake upstream that can be switched off: the upstream
    meter knows becomes unreachable (connections refused, open ones cut)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def __aenter__(self) -> Self:
        await self.switch_on()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.switch_off()

    async def switch_on(self) -> None:
        """Listen (again) on the same port."""
        self.server = await asyncio.start_server(self._pipe_both_ways, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def switch_off(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.close()

    async def _pipe_both_ways(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {client_writer, up_writer}

        async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(copy(client_reader, up_writer), copy(up_reader, client_writer))
        self.writers -= {client_writer, up_writer}


@pytest.fixture
def webhook() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess("tests.webhook_receiver").start()
    yield proc
    proc.stop()


@contextlib.asynccontextmanager
async def meter_under_umask_000(args: list[str], env: dict[str, str], log_path: Path) -> AsyncIterator[MeterProcess]:
    """`meter serve` started from a shell whose umask lets anyone read what it creates."""
    meter = MeterProcess(args, env=env, log_path=log_path)
    previous = os.umask(0)
    try:
        await asyncio.get_running_loop().run_in_executor(None, meter.start)
    finally:
        os.umask(previous)
    try:
        yield meter
    finally:
        meter.stop()


def raw_exchange(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def modes_of(root: Path) -> dict[str, int]:
    found = {}
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            found[str(path)] = stat.S_IMODE(path.lstat().st_mode)
    return found


async def test_canary_keys_reach_no_output_and_files_are_owner_only(upstream, webhook, flaky_mount, tmp_path: Path) -> None:  # noqa: F811
    mount, set_full = flaky_mount
    ledger_dir = mount / "ledger"
    ledger_dir.mkdir()
    os.chmod(ledger_dir, 0o777)  # the operator's directory: meter must not widen what it puts there
    ledger = ledger_dir / "meter.duckdb"
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = spool_dir / "meter.spool.jsonl"
    other_secrets = {
        "admin token": "admintoken-" + secrets.token_hex(16),
        "collector header": "collector-" + secrets.token_hex(16),
        "webhook path": "HOOK" + secrets.token_hex(16),
    }
    config = tmp_path / "meter.toml"
    config.write_text(
        '[[budgets]]\nname = "canary"\nwindow = "day"\nlimit_usd = 0.0001\nmode = "observe"\nalert_at = [0.5, 1.0]\n'
        f'[alerts]\nwebhooks = ["{webhook.url}/services/{other_secrets["webhook path"]}"]\n'
    )
    log_path = tmp_path / "meter.log"
    async with OTLPReceiver() as otlp, SwitchableRelay(int(upstream.url.rsplit(":", 1)[1])) as relay:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=" + other_secrets["collector header"],
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "METER_ADMIN_TOKEN": other_secrets["admin token"],
        }
        args = [
            "--upstream", f"http://127.0.0.1:{relay.port}", "--ledger", str(ledger), "--spool", str(spool),
            "--config", str(config), "--log-level", "debug", "--access-log", "--flush-interval", "0.05",
            "--ledger-max-pending", "3", "--max-request-bytes", "65536", "--shutdown-grace", "10",
        ]  # fmt: skip
        async with meter_under_umask_000(args, env, log_path) as meter:
            admin = {"Authorization": "Bearer " + other_secrets["admin token"]}
            async with aiohttp.ClientSession() as http:
                await send_http_channels(http, meter)
                await send_byte_level_channels(meter.port)
                await send_websocket_channels(http, meter)
                # The WAL exists while meter runs; DuckDB's spill files while a query needs them.
                running_modes = await modes_during_a_spilling_query(http, meter.admin_url, admin, ledger_dir)
                # The ledger's disk fills: records go to the spool.
                set_full(True)
                try:
                    for _ in range(5):
                        await post(http, meter.url, {"Authorization": "Bearer " + CANARIES["spooled"]})
                    await wait_until(spool.exists, "records were spooled")
                    spooling_modes = modes_of(spool_dir)  # replayed and removed once the disk has room
                    spooled = spool.read_bytes()
                finally:
                    set_full(False)
                await relay.switch_off()
                assert await post(http, meter.url, {"Authorization": "Bearer " + CANARIES["upstream_down"]}, query="?key=" + CANARIES["upstream_down"]) == 502
                answers = {path: await admin_get(http, meter.admin_url + path, admin) for path in ADMIN_PATHS}
                async with http.post(meter.admin_url + "/api/sql", headers=admin, json={"sql": "SELECT * FROM requests"}) as r:
                    answers["/api/sql"] = await r.read()
                await wait_for_alerts(http, webhook.url, 2)
            # SIGTERM while a stream is in flight: its record is written at exit like the rest.
            await relay.switch_on()
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": "Bearer " + CANARIES["sigterm"], "x-fake-chunk-delay-ms": "50"}
                in_flight = asyncio.create_task(post(http, meter.url, headers, stream=True))
                deadline = time.monotonic() + 10
                while b"meter_in_flight_requests{" not in (metrics := await admin_get(http, meter.admin_url + "/metrics", admin)) or not any(
                    line.startswith(b"meter_in_flight_requests{") and not line.endswith(b" 0.0") for line in metrics.splitlines()
                ):
                    assert time.monotonic() < deadline, "the stream never reached meter"
                    await asyncio.sleep(0.02)
                meter.signal(signal.SIGTERM)
                assert await in_flight == 200
                assert await asyncio.get_running_loop().run_in_executor(None, meter.wait) == 0

    assert running_modes[str(ledger) + ".wal"] == 0o600
    assert any(path.endswith(".tmp") for path in running_modes), "the query spilled nothing to disk"
    outputs: dict[str, bytes] = {f"admin {path}": body for path, body in answers.items()}
    outputs["meter's log"] = log_path.read_bytes()
    outputs["the spool"] = spooled
    outputs["spans"] = json.dumps([[s.name, s.attributes, s.resource, s.status_message, s.trace_state] for s in otlp.spans], default=str).encode()
    outputs["metric points"] = json.dumps([[p.name, p.attributes, p.resource] for p in otlp.points], default=str).encode()
    outputs["webhook bodies"] = json.dumps([[hook["body"], hook["headers"]] for hook in await received(webhook.url)]).encode()
    for command in (
        ["report", "--ledger", str(ledger), "--by", "key,model,user,endpoint,tag:x", "--format", "json"],
        ["sql", "--ledger", str(ledger), "--format", "json", "SELECT * FROM requests"],
        ["budgets", "--ledger", str(ledger), "--config", str(config), "--format", "json"],
    ):
        done = subprocess.run([sys.executable, "-m", "meter", *command], cwd=ROOT, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs["meter " + " ".join(command[:1])] = done.stdout + done.stderr
    for path in [*ledger_dir.rglob("*"), *spool_dir.rglob("*")]:
        if path.is_file():  # the spool's records were replayed: what is left
            outputs[str(path)] = path.read_bytes()
    found = {where: names for where, blob in outputs.items() if (names := leaks(blob, other_secrets))}
    assert not found, f"secrets found: {found}"
    # The run reached the places searched: rows of every kind, the spooled and the last one too.
    hints = {row["key_hint"] for row in json.loads(outputs["meter sql"])}
    assert hints >= {"sk-..." + CANARIES[name][-HINT:] for name in ("bearer", "x_api_key", "api_key", "ws_sdk", "spooled", "upstream_down", "sigterm")}
    assert len(otlp.spans) >= 20 and otlp.points and len(json.loads(outputs["webhook bodies"])) >= 2
    created = {path: mode for path, mode in {**running_modes, **spooling_modes, **modes_of(ledger_dir)}.items() if path != str(ledger_dir)}
    assert str(ledger) in created and str(spool) in created
    loose = {path: oct(mode) for path, mode in created.items() if mode & 0o077}
    assert not loose, f"files meter created that others may read: {loose}"


# A sort larger than the ledger process's memory_limit: DuckDB spills it to `<ledger>.tmp/`.
SPILLING_QUERY = "SELECT count(*) FROM (SELECT range::VARCHAR || repeat('x', 36) AS s FROM range(1000000) ORDER BY s DESC)"


async def modes_during_a_spilling_query(http: aiohttp.ClientSession, admin_url: str, headers: dict[str, str], ledger_dir: Path) -> dict[str, int]:
    """The mode of every file under `ledger_dir` seen while a query spills (they live only as long as it)."""
    seen: dict[str, int] = {}
    done = False

    def watch() -> None:
        while not done:
            seen.update(modes_of(ledger_dir))

    watcher = asyncio.get_running_loop().run_in_executor(None, watch)
    try:
        async with http.post(admin_url + "/api/sql", headers=headers, json={"sql": SPILLING_QUERY}) as r:
            assert r.status == 200, await r.text()
    finally:
        done = True
        await watcher
    return seen


ADMIN_PATHS = ("/metrics", "/readyz", "/api/budgets", "/api/report?by=key,model,user,endpoint", "/api/requests", "/")


async def admin_get(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> bytes:
    async with http.get(url, headers=headers) as r:
        assert r.status == 200, (url, r.status)
        return await r.read()


async def received(webhook_url: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(webhook_url + "/__received") as r:
        return await r.json()


async def wait_for_alerts(http: aiohttp.ClientSession, webhook_url: str, count: int) -> None:
    async def enough() -> bool:
        return len(await received(webhook_url)) >= count

    for _ in range(100):
        if await enough():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the budget's alerts did not arrive")


async def wait_until(check: object, what: str) -> None:
    for _ in range(200):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


BODY = {"model": "gpt-4o", "input": "hi"}


async def post(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], body: object = BODY, *, query: str = "", stream: bool = False, raw: bytes | None = None
) -> int:
    data = raw if raw is not None else json.dumps({**body, "stream": True} if stream and isinstance(body, dict) else body).encode()
    try:
        async with http.post(base + "/v1/responses" + query, data=data, headers={"Content-Type": "application/json", **headers}) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError:
        return -1


async def send_http_channels(http: aiohttp.ClientSession, meter: MeterProcess) -> None:
    k = CANARIES
    ok = [
        await post(http, meter.url, {"Authorization": "Bearer " + k["bearer"]}),
        await post(http, meter.url, {"Authorization": "Bearer " + k["bearer_stream"]}, stream=True),
        await post(http, meter.url, {"x-api-key": k["x_api_key"]}),
        await post(http, meter.url, {"api-key": k["api_key"]}),
        await post(http, meter.url, {}, query=f"?api-key={k['query']}&key={k['query']}"),
        await post(http, meter.url, {"Authorization": k["no_scheme"]}),
        await post(http, meter.url, {"Authorization": "Bearer" + k["scheme_glued"]}),
        await post(http, meter.url, {"Authorization": "Token " + k["token_scheme"]}),
        await post(http, meter.url, {"Authorization": "Basic " + base64.b64encode(b"user:" + k["basic"].encode()).decode()}),
        await post(http, meter.url, {"Authorization": f"Bearer {k['bearer_extra']} trailing words"}),
        await post(http, meter.url, {"Authorization": "Bearer " + k["connection_named"], "Connection": "keep-alive, Authorization"}),
        await post(http, meter.url, {}, {**BODY, "api_key": k["body_field"]}),
        await post(http, meter.url, {"Authorization": "Bearer " + k["metadata_header"], "Meter-Tag-x": "y"}),
    ]
    assert ok == [200] * len(ok)
    # A client that hangs up mid-stream.
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + k["hangup"], "x-fake-chunk-delay-ms": "50", "x-fake-deltas": "20"}
    async with http.post(meter.url + "/v1/responses", data=json.dumps({**BODY, "stream": True}), headers=headers) as r:
        await r.content.readany()
    failing = [
        await post(http, meter.url, {"Authorization": "Bearer " + k["oversized"]}, raw=b"x" * 100_000),
        await post(http, meter.url, {"Authorization": "Bearer " + k["bad_json"]}, raw=b'{"model": "gpt-4o", "input": '),
        await post(
            http, meter.url,
            {"Authorization": "Bearer " + k["upstream_401"], "x-fake-scenario": "status:401",
             "x-fake-error": json.dumps({"message": "Incorrect API key provided: " + k["upstream_401"], "code": "invalid_api_key"})},
        ),
    ]  # fmt: skip
    assert failing == [413, 400, 401]


async def send_byte_level_channels(port: int) -> None:
    k = CANARIES
    loop = asyncio.get_running_loop()
    requests = [
        f"GET http://user:{k['absolute_userinfo']}@elsewhere.test/v1/models?key={k['absolute_userinfo']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        f"GET {k['refused_target']}?key={k['refused_target']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        f"CONNECT user:{k['refused_target']}@elsewhere.test:443 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {k['bad_header_byte']}\x01\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
        f"POST /v1/responses?key={k['bad_header_byte']} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {k['bad_header_byte']}\r\nContent-Length: zz\r\nConnection: close\r\n\r\n",
        f"POST /v1/resp onses?key={k['bad_header_byte']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {k['long_header']}{'A' * 70_000}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
    ]
    statuses = []
    for text in requests:
        answer = await loop.run_in_executor(None, raw_exchange, port, text.encode())
        statuses.append(answer.split(b" ", 2)[1] if answer else b"")
    assert statuses[0] == b"200" and all(s.startswith(b"4") for s in statuses[1:]), statuses


async def send_websocket_channels(http: aiohttp.ClientSession, meter: MeterProcess) -> None:
    k = CANARIES
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=k["ws_sdk"], max_retries=0)
    async with client.responses.connect() as connection:
        await connection.response.create(model="gpt-4o", input="hi")
        async for event in connection:
            if event.type == "response.completed":
                break
    ws_base = "ws" + meter.url.removeprefix("http")
    url = f"{ws_base}/v1/responses?api-key={k['query_ws']}"
    async with http.ws_connect(url, protocols=["openai-insecure-api-key." + k["ws_subprotocol"], "realtime"]) as ws:
        await ws.send_str(json.dumps({"type": "response.create", "model": "gpt-4o", "input": "hi"}))
        async for message in ws:
            if "response.completed" in message.data:
                break
    with pytest.raises(aiohttp.WSServerHandshakeError):
        async with http.ws_connect(ws_base + "/v1/responses", headers={"Authorization": "Bearer " + k["ws_refused"], "x-fake-ws-refuse": "401"}):
            pass
