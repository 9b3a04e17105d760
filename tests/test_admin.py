"""The admin port as an attacker and an operator meet it (SPEC §2b, the admin items).

Every test drives a real `meter serve` (or, for the start-up clean-up, a real
`Meter` in this process) over raw sockets or meter's own CLI:

- with a token, every admin path but `/healthz` and `/readyz` answers 401 with
  `WWW-Authenticate: Bearer` unless the request carries `Authorization: Bearer
  <token>`, however the path is spelled; the token is never logged;
- a non-loopback admin address without a token refuses to start, before
  anything is bound, unless `--admin-insecure` (then a warning);
- `/readyz` reports states, never the store's error text;
- `meter report --url` sends `METER_ADMIN_TOKEN`, and a 401 is one line;
- out-of-range report windows are a 400 and one CLI line; a report that
  cannot see every record says so (`Meter-Report-Pending`, one stderr line);
- a start-up that fails after binding releases its ports and stops what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meter.config import StartupError, load_settings
from meter.server import Meter

from .conftest import ROOT, SECRET_KEY, MeterProcess, free_port
from .test_report import assert_one_line_error

TOKEN = "adm-0c5e1d9a7b3f4e2d8c6a-TOKEN"  # distinctive, so a leak check means something


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any admin token of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "METER_ADMIN_TOKEN"}
    env.update(extra)
    return env


def raw_request(port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange over a plain socket: the target is sent exactly as given."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(status_line.split()[1]), parsed, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


async def araw(port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.get_running_loop().run_in_executor(None, raw_request, port, target, headers, method)


def run_meter(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meter", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or clean_env())


async def arun_meter(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meter", *args, cwd=ROOT, env=env or clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


async def send_requests(proxy_url: str, n: int) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}", "x-fake-usage": json.dumps({"input_tokens": 7, "output_tokens": 3})}
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.post(proxy_url + "/v1/responses", data=b'{"model": "gpt-4o", "input": "x"}', headers=headers) as r:
                assert r.status == 200
                await r.read()


def assert_unauthorized(status: int, headers: dict[str, str], body: bytes, what: str) -> None:
    assert status == 401, (what, status, body[:200])
    assert headers.get("www-authenticate", "").startswith("Bearer"), (what, headers)
    error = json.loads(body)["error"]
    assert isinstance(error, dict) and error["message"] and "\n" not in error["message"], (what, error)
    assert TOKEN not in body.decode("utf-8", "replace")


# --- 1. the token ---------------------------------------------------------------------


async def test_token_guards_every_admin_path_but_health(upstream, meter_process, tmp_path: Path) -> None:
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), "--log-level", "debug", env=clean_env(METER_ADMIN_TOKEN=TOKEN))
    await send_requests(proc.url, 2)
    port = proc.admin_port
    good = {"Authorization": f"Bearer {TOKEN}"}
    wrong = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer \u00e9t\u00e9".encode().decode("latin-1")},  # non-ASCII bytes must not crash the comparison
        {"X-Admin-Token": TOKEN},
    ]
    # Spellings of the guarded paths that must not slip past the guard.
    targets = ["/metrics", "/api/report", "/api/report?by=model", "/metrics?healthz", "/healthz/../metrics", "/%6detrics", "//metrics", "/no-such-path", "/readyz/x", "/healthz2"]
    for target in targets:
        for headers in wrong:
            status, got, body = await araw(port, target, headers)
            assert_unauthorized(status, got, body, f"{target} {headers}")
        status, got, body = await araw(port, target, {}, method="HEAD")
        assert status == 401, (target, "HEAD")
    for method in ("POST", "PUT", "DELETE"):
        status, got, body = await araw(port, "/api/report", {}, method=method)
        assert status == 401, method

    # The right token opens them; the scheme is case-insensitive (RFC 9110 §11.1).
    status, _, body = await araw(port, "/metrics", good)
    assert status == 200 and b"meter_requests_total" in body
    status, _, body = await araw(port, "/api/report?by=model", {"Authorization": f"bearer {TOKEN}"})
    assert status == 200 and json.loads(body)[0]["requests"] == 2
    status, _, _ = await araw(port, "/no-such-path", good)
    assert status == 404

    # Probes need no token: the kubelet and Docker's HEALTHCHECK have none.
    for target in ("/healthz", "/readyz"):
        status, _, body = await araw(port, target)
        assert status == 200, target
        status, _, _ = await araw(port, target, {"Authorization": "Bearer wrong"})
        assert status == 200, target

    proc.stop()
    log = (tmp_path / "meter0.log").read_bytes()
    assert TOKEN.encode() not in log and TOKEN[:12].encode() not in log


async def test_admin_token_flag_beats_the_environment(upstream, meter_process, tmp_path: Path) -> None:
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), "--admin-token", TOKEN, env=clean_env(METER_ADMIN_TOKEN="from-env"))
    status, _, _ = await araw(proc.admin_port, "/metrics", {"Authorization": "Bearer from-env"})
    assert status == 401
    status, _, _ = await araw(proc.admin_port, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200


# --- 2. a non-loopback admin address ---------------------------------------------------


def test_loopback_hosts() -> None:
    from meter.admin import is_loopback_host

    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.5", "meter.internal", "", "localhost.evil.example", "::ffff:10.0.0.1"):
        assert not is_loopback_host(host), host


def test_non_loopback_admin_without_token_refuses_before_binding(tmp_path: Path) -> None:
    ledger = tmp_path / "l.duckdb"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        # The proxy port is taken: had meter bound anything first, the line would be about it.
        for admin in (f"0.0.0.0:{free_port()}", f"[::]:{free_port()}", f":{free_port()}"):
            result = run_meter("serve", "--listen", f"127.0.0.1:{busy_port}", "--admin-listen", admin, "--ledger", str(ledger))
            line = assert_one_line_error(result, "admin-listen", "admin-token", "METER_ADMIN_TOKEN", "--admin-insecure")
            assert str(busy_port) not in line
        via_env = run_meter("serve", "--listen", f"127.0.0.1:{busy_port}", "--ledger", str(ledger), env=clean_env(METER_ADMIN_LISTEN=f"0.0.0.0:{free_port()}"))
        assert_one_line_error(via_env, "admin-listen", "admin-token")
    assert not ledger.exists(), "nothing was opened"


async def test_non_loopback_admin_starts_with_a_token_or_insecure(upstream, tmp_path: Path) -> None:
    for n, (extra, env) in enumerate([([], clean_env(METER_ADMIN_TOKEN=TOKEN)), (["--admin-insecure"], clean_env())]):
        proc = MeterProcess(["--upstream", upstream.url, "--ledger", str(tmp_path / f"l{n}.duckdb"), *extra], env=env, log_path=tmp_path / f"m{n}.log")
        proc.args += ["--admin-listen", f"0.0.0.0:{proc.admin_port}"]  # the last flag wins
        try:
            proc.start()
            status, _, _ = await araw(proc.admin_port, "/metrics")
            assert status == (401 if not extra else 200)
        finally:
            proc.stop()
        log = (tmp_path / f"m{n}.log").read_text()
        warnings = [line for line in log.splitlines() if "WARNING" in line and "admin" in line]
        if extra:
            assert len(warnings) == 1 and "--admin-insecure" in warnings[0] and "0.0.0.0" in warnings[0], log
        else:
            assert not warnings, log


# --- 3. /readyz -----------------------------------------------------------------------


async def test_readyz_reports_states_never_the_store_error(upstream, postgres, meter_process, tmp_path: Path) -> None:
    url = postgres.new_database()
    proc = meter_process("--upstream", upstream.url, "--ledger", url, "--spool", str(tmp_path / "spool.jsonl"), "--flush-interval", "0.1")
    status, _, body = await araw(proc.admin_port, "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "ledger": "ok", "ledger_pending_records": 0}
    postgres.stop()
    try:
        await send_requests(proc.url, 3)
        deadline = time.monotonic() + 20
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, _, body = await araw(proc.admin_port, "/readyz")
            state = json.loads(body)
            if state["ledger"] == "failing" and state["ledger_pending_records"] == 3:
                break
            await asyncio.sleep(0.1)
        assert status == 200  # a ledger outage never takes the replica out of a load balancer
        assert state == {"ready": True, "ledger": "failing", "ledger_pending_records": 3}, state
        text = body.decode()
        for leak in ("Error", "refused", "connect", str(postgres.port), postgres.password):
            assert leak not in text, leak
        # A report cannot be read now: one line to the caller, one line in the log.
        status, _, body = await araw(proc.admin_port, "/api/report")
        assert status == 503, (status, body)
        assert "\n" not in json.loads(body)["error"]
        assert postgres.password not in body.decode()
    finally:
        postgres.start()
    proc.stop()
    log = (tmp_path / "meter0.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert [line for line in log.splitlines() if "report failed" in line], log[-3000:]


# --- 4. meter report --url sends the token --------------------------------------------


async def test_report_url_sends_the_admin_token(upstream, meter_process, tmp_path: Path) -> None:
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), env=clean_env(METER_ADMIN_TOKEN=TOKEN))
    await send_requests(proc.url, 3)
    missing = assert_one_line_error(await arun_meter("report", "--url", proc.admin_url, "--format", "json"), "--url", "401", "METER_ADMIN_TOKEN")
    assert TOKEN not in missing
    wrong = assert_one_line_error(await arun_meter("report", "--url", proc.admin_url, env=clean_env(METER_ADMIN_TOKEN="not-it")), "--url", "401", "METER_ADMIN_TOKEN")
    assert "not-it" not in wrong
    ok = await arun_meter("report", "--url", proc.admin_url, "--by", "model", "--format", "json", env=clean_env(METER_ADMIN_TOKEN=TOKEN))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    [row] = json.loads(ok.stdout)
    assert (row["model"].startswith("gpt-4o"), row["requests"], row["input_tokens"]) == (True, 3, 21)


async def test_the_admin_token_never_goes_to_an_address_that_did_not_ask_for_it(upstream, meter_process, tmp_path: Path) -> None:
    """`--url` given the proxy's port instead of the admin's: the request is forwarded
    to the upstream, and with it the admin token, to a third party.  The token goes only
    to an address that asked for it as meter's admin API does (a 401 with its realm)."""
    from .conftest import clear_upstream_requests, upstream_requests

    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), env=clean_env(METER_ADMIN_TOKEN=TOKEN))
    await clear_upstream_requests(upstream.url)
    for args in (("report", "--format", "json"), ("sql", "SELECT 1 AS n", "--format", "json"), ("budgets", "--format", "json")):
        result = await arun_meter(*args[:1], "--url", proc.url, *args[1:], env=clean_env(METER_ADMIN_TOKEN=TOKEN))
        assert result.returncode != 0 and TOKEN not in result.stderr + result.stdout
    seen = json.dumps(await upstream_requests(upstream.url))
    assert TOKEN not in seen
    # The admin address still gets it, and answers.
    ok = await arun_meter("report", "--url", proc.admin_url, "--format", "json", env=clean_env(METER_ADMIN_TOKEN=TOKEN))
    assert ok.returncode == 0, ok.stderr


async def test_an_admin_token_read_from_a_file_with_its_line_break(upstream, meter_process, tmp_path: Path) -> None:
    """A token kept in a file (a Kubernetes Secret made --from-file, `$(cat token)` of an
    editor's file) ends in a line break.  meter served it as part of the token, which no
    client can send (a header value has no line break: Prometheus and curl send it
    trimmed), so every admin path was a 401 for good; and `meter report|sql|budgets --url`
    died on it with a traceback that printed the token whole.  Surrounding whitespace is
    no part of a token, as it already was not of the one presented."""
    padded = f"{TOKEN}\n"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), env=clean_env(METER_ADMIN_TOKEN=padded))
    await send_requests(proc.url, 2)
    status, _, body = await araw(proc.admin_port, "/api/report", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)[0]["requests"] == 2, (status, body[:300])
    # Every client below is its own process; they run side by side.
    padded_args = (("report", "--format", "json"), ("sql", "SELECT count(*) AS n FROM requests", "--format", "json"), ("budgets", "--format", "json"))
    results = await asyncio.gather(*(arun_meter(*args[:1], "--url", proc.admin_url, *args[1:], env=clean_env(METER_ADMIN_TOKEN=padded)) for args in padded_args))
    for args, result in zip(padded_args, results):
        assert result.returncode == 0 and TOKEN not in result.stderr, (args, result.stderr[-2000:])
    # A control character inside a token cannot be sent at all: one line and exit 2 from
    # both ends, never the token.
    broken = "adm-\x01-inside-TOKEN"
    # ... nor a character outside ASCII the same way by every client (urllib's traceback).
    cases = list(itertools.product((broken, "adm-\u20ac-inside-TOKEN"), (("report",), ("sql", "SELECT 1"), ("budgets",))))
    served, *clients = await asyncio.gather(
        arun_meter("serve", "--upstream", upstream.url, "--ledger", str(tmp_path / "b.duckdb"), env=clean_env(METER_ADMIN_TOKEN=broken)),
        *(arun_meter(*args[:1], "--url", proc.admin_url, *args[1:], env=clean_env(METER_ADMIN_TOKEN=token)) for token, args in cases),
    )
    refused = assert_one_line_error(served, "admin-token")
    assert "inside-TOKEN" not in refused
    for result in clients:
        line = assert_one_line_error(result, "METER_ADMIN_TOKEN")
        assert "inside-TOKEN" not in line


HOSTILE_SQL_BODIES = [
    b'{"sql": "SELECT 1", "limit": 1e400}',  # a float that is infinite: int() raised OverflowError
    b'{"sql": "SELECT 1", "limit": -Infinity}',
    b'{"sql": "SELECT 1", "limit": NaN}',
    b'{"sql": "SELECT 1", "timeout": Infinity}',
    b"[" * 100_000,  # nesting past the JSON reader's recursion limit
    b'{"sql": "SELECT 1 -- \\ud800"}',  # a lone surrogate: no string DuckDB or PostgreSQL can take
    b"\xff\xfe",
]


def hostile_report_bodies() -> list[bytes]:
    """Bodies of `POST /api/report` (key names over meter's own) no report can take."""
    from meter.identity import key_id

    return [b"[" * 100_000, b'{"keys": {"%s": "team-\\ud800"}}' % key_id(SECRET_KEY).encode()]


async def test_hostile_admin_bodies_are_a_400_and_one_line(upstream, meter_process, tmp_path: Path) -> None:
    """SPEC: admin API inputs out of range are a 400 with a one-line message.  An infinite
    limit and a deeply nested body were a bare 500 with a traceback in the log; a lone
    surrogate in the statement reached the ledger process and came back as a 503 saying
    the ledger could not be read; the same nesting posted to `/api/report`, or a key
    named with a lone surrogate there, was a 500 too."""
    proc = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb"), env=clean_env())
    await send_requests(proc.url, 1)
    async with aiohttp.ClientSession() as http:
        for path, body in [*(("/api/sql", b) for b in HOSTILE_SQL_BODIES), *(("/api/report?by=key", b) for b in hostile_report_bodies())]:
            async with http.post(proc.admin_url + path, data=body) as r:
                text = await r.text()
                assert r.status == 400, (path, body[:40], r.status, text[:300])
                error = json.loads(text)["error"]
                assert error and "\n" not in error, (body[:40], error)
        async with http.post(proc.admin_url + "/api/sql", json={"sql": "SELECT 1 AS one"}) as r:
            assert r.status == 200 and (await r.json())["rows"] == [{"one": 1}]
    log = (tmp_path / "meter0.log").read_text()
    assert "Traceback" not in log and "sql failed" not in log, log[-3000:]


# --- 5. inputs out of range; a report that cannot see every record ---------------------


OUT_OF_RANGE = [
    {"since": "999999999d"},
    {"since": "99999999999999999999d"},
    {"since": "9999999999999999w"},
    {"until": "9999-12-31"},
    {"until": "9999-12-31T23:59:59-05:00"},
    {"since": "0001-01-01T00:00:00+05:00"},
    {"since": "0000-01-01"},
    {"since": "10000-01-01"},
]


async def test_out_of_range_windows_are_a_400_and_one_cli_line(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "l.duckdb"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    await send_requests(proc.url, 1)
    for params in OUT_OF_RANGE:
        query = "&".join(f"{k}={v.replace('+', '%2B')}" for k, v in params.items())
        status, _headers, body = await araw(proc.admin_port, "/api/report?" + query)
        assert status == 400, (params, status, body[:300])
        message = json.loads(body)["error"]
        assert message and "\n" not in message and "Traceback" not in message, message
        [(name, _value)] = params.items()
        assert f"--{name}" in message, message
    cli = await asyncio.gather(*(arun_meter("report", "--url", proc.admin_url, f"--{k}", v) for p in OUT_OF_RANGE for k, v in p.items()))
    for params, result in zip(OUT_OF_RANGE, cli):
        [name] = params
        assert_one_line_error(result, f"--{name}")
    # The widest window that fits still works, over the live proxy and over a file.
    status, _, body = await araw(proc.admin_port, "/api/report?since=0001-01-01&until=9999-12-30")
    assert status == 200 and json.loads(body)[0]["requests"] == 1
    proc.stop()
    cli = await asyncio.gather(*(arun_meter("report", "--ledger", str(ledger), f"--{k}", v) for p in OUT_OF_RANGE for k, v in p.items()))
    for params, result in zip(OUT_OF_RANGE, cli):
        [name] = params
        assert_one_line_error(result, f"--{name}")
    wide = await arun_meter("report", "--ledger", str(ledger), "--since", "0001-01-01", "--until", "9999-12-30", "--format", "json")
    assert wide.returncode == 0 and json.loads(wide.stdout)[0]["requests"] == 1, wide.stderr


@contextlib.asynccontextmanager
async def inserts_held(url: str) -> AsyncIterator[None]:
    """The ledger's table held for the block: reads go on (EXCLUSIVE admits ACCESS
    SHARE), inserts wait."""
    import asyncpg

    holder = await asyncpg.connect(url)
    tx = holder.transaction()
    await tx.start()
    try:
        await holder.execute("LOCK TABLE requests IN EXCLUSIVE MODE")
        yield
    finally:
        await tx.rollback()
        await holder.close()


async def test_a_report_that_cannot_see_every_record_says_so(upstream, postgres, meter_process, tmp_path: Path) -> None:

    url = postgres.new_database()
    proc = meter_process("--upstream", upstream.url, "--ledger", url, "--spool", str(tmp_path / "spool.jsonl"), "--flush-interval", "0.1")
    await send_requests(proc.url, 2)
    status, headers, body = await araw(proc.admin_port, "/api/report")
    assert status == 200 and "meter-report-pending" not in headers and json.loads(body)[0]["requests"] == 2

    async with inserts_held(url):
        await send_requests(proc.url, 3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and json.loads((await araw(proc.admin_port, "/readyz"))[2])["ledger_pending_records"] != 3:
            await asyncio.sleep(0.05)  # the last record is queued just after its answer
        status, headers, body = await araw(proc.admin_port, "/api/report")
        assert status == 200, body
        assert headers.get("meter-report-pending") == "3", headers
        assert json.loads(body)[0]["requests"] == 2  # what the ledger holds, in the usual shape
        # Both at once: each waits for the flush the lock holds up.
        results = await asyncio.gather(*(arun_meter("report", "--url", proc.admin_url, "--format", fmt) for fmt in ("json", "csv")))
        for fmt, result in zip(("json", "csv"), results):
            assert result.returncode == 0, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "warning" in lines[0] and "3" in lines[0] and "Traceback" not in result.stderr, result.stderr
            if fmt == "json":
                assert json.loads(result.stdout)[0]["requests"] == 2
            else:
                assert result.stdout.splitlines()[0].startswith("requests,") and result.stdout.splitlines()[1].startswith("2,")
    status, headers, body = await araw(proc.admin_port, "/api/report")
    assert status == 200 and "meter-report-pending" not in headers and json.loads(body)[0]["requests"] == 5
    clean = await arun_meter("report", "--url", proc.admin_url, "--format", "json")
    assert clean.returncode == 0 and clean.stderr == ""


async def test_a_report_counts_the_records_waiting_in_the_spool(upstream, postgres, meter_process, tmp_path: Path) -> None:
    """Records spilled to the spool while the ledger is held up are not in the ledger
    either: the report's Meter-Report-Pending, /readyz and the pending gauge count them,
    not only the few still in memory (--ledger-max-pending)."""

    url = postgres.new_database()
    spool = tmp_path / "spool.jsonl"
    proc = meter_process("--upstream", upstream.url, "--ledger", url, "--spool", str(spool), "--flush-interval", "0.1", "--ledger-max-pending", "2")
    deadline = time.monotonic() + 30
    while not json.loads((await araw(proc.admin_port, "/readyz"))[2]).get("ready"):  # the ledger's tables are made
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    async with inserts_held(url):
        await send_requests(proc.url, 8)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not spool.exists() or len(spool.read_text().splitlines()) < 5):
            await asyncio.sleep(0.05)
        assert len(spool.read_text().splitlines()) >= 5  # most of them are in the spool, not in memory
        status, headers, body = await araw(proc.admin_port, "/api/report")
        assert status == 200, body
        assert headers.get("meter-report-pending") == "8", headers
        assert json.loads((await araw(proc.admin_port, "/readyz"))[2])["ledger_pending_records"] == 8
        metrics = (await araw(proc.admin_port, "/metrics"))[2].decode()
        pending, spooled = (float(line.split()[-1]) for name in ("pending", "spooled") for line in metrics.splitlines() if line.startswith(f"meter_ledger_{name}_records "))
        assert pending <= 2 + 1 and pending + spooled == 8  # in memory: the bound and the batch held in the insert
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, headers, body = await araw(proc.admin_port, "/api/report")
        if "meter-report-pending" not in headers:
            break
        await asyncio.sleep(0.2)
    assert status == 200 and "meter-report-pending" not in headers and json.loads(body)[0]["requests"] == 8


async def test_a_ledger_report_names_records_still_in_the_spool(upstream, meter_process, tmp_path: Path) -> None:
    """A stopped meter whose ledger was down left records in its spool: `--ledger` says they are not counted."""
    from meter.ledger import Spool

    from .test_report import make_record

    ledger = tmp_path / "l.duckdb"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    await send_requests(proc.url, 2)
    proc.stop()
    clean = await arun_meter("report", "--ledger", str(ledger), "--format", "json")
    assert clean.returncode == 0 and clean.stderr == "" and json.loads(clean.stdout)[0]["requests"] == 2
    Spool(Path(str(ledger) + ".spool.jsonl")).append([make_record(input_tokens=5, output_tokens=1) for _ in range(3)])
    for fmt in ("json", "csv"):
        result = await arun_meter("report", "--ledger", str(ledger), "--format", fmt)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "warning" in lines[0] and "3 records" in lines[0] and "spool" in lines[0], result.stderr
        first = json.loads(result.stdout)[0]["requests"] if fmt == "json" else int(result.stdout.splitlines()[1].split(",")[0])
        assert first == 2  # the ledger's rows, in the usual shape


# --- 8. a start-up that fails after binding --------------------------------------------


class FailsToStart:
    """An addon whose start() fails, as the ledger's does on an unusable file."""

    async def start(self) -> None:
        raise StartupError("ledger: test addon cannot start")


def can_bind(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


async def test_failed_start_releases_ports_and_stops_what_it_started(upstream, tmp_path: Path) -> None:
    addon = FailsToStart()
    port, admin = free_port(), free_port()
    ledger = tmp_path / "l.duckdb"
    settings = load_settings({"upstream": upstream.url, "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "ledger": str(ledger)}, env={})
    before = {t.ident for t in threading.enumerate()}
    meter = Meter(settings, extra_addons=[addon])
    with pytest.raises(StartupError, match="test addon"):
        await meter.start()
    assert can_bind(port) and can_bind(admin), "the ports were released"
    assert meter.session is None or meter.session.closed
    assert not meter.accepting
    leftover = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert "meter-ledger" not in leftover, leftover
    assert getattr(meter.store, "con", None) is None, "the ledger is closed"
    # The ledger file, if the writer got to open it, is free for the next meter.
    again = Meter(load_settings({"upstream": upstream.url, "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "ledger": str(ledger)}, env={}))
    await again.start()
    await again.stop()


def test_unusable_ledger_exits_promptly_with_one_line(tmp_path: Path) -> None:
    """The ledger refuses to start (an unusable file) after the ports are bound: exit 2, one line, at once."""
    ledger = tmp_path / "not-a-ledger.duckdb"
    ledger.write_bytes(b"this is not a DuckDB file\n" * 100)
    started = time.monotonic()
    result = run_meter("serve", "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}", "--ledger", str(ledger), timeout=30)
    assert time.monotonic() - started < 15
    assert_one_line_error(result, "ledger")


def host_request(port: int, target: str, host: str, headers: dict[str, str] | None = None) -> int:
    """The status of one GET whose Host header is `host`, as a browser sends it."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


async def test_a_tokenless_loopback_admin_answers_only_requests_addressed_to_loopback(upstream, tmp_path: Path) -> None:
    """DNS rebinding: a web page the operator opens gets its own name resolved to
    127.0.0.1, and the browser then reads the admin port as that page's own origin
    (spend, key names, users, `/api/sql`).  The browser still sends the page's name as
    Host: without a token, only a loopback name or address is answered."""
    proc = MeterProcess(["--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb")], env=clean_env(), log_path=tmp_path / "m.log")
    try:
        proc.start()
        port = proc.admin_port
        loop = asyncio.get_running_loop()

        def status(target: str, host: str) -> int:
            return host_request(port, target, host)

        for target in ("/api/report", "/api/requests", "/metrics", "/api/budgets"):
            assert await loop.run_in_executor(None, status, target, "attacker.example") == 403, target
            assert await loop.run_in_executor(None, status, target, f"attacker.example:{port}") == 403, target
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"127.0.0.2:{port}"):
            assert await loop.run_in_executor(None, status, "/metrics", host) == 200, host
        assert await loop.run_in_executor(None, status, "/healthz", "attacker.example") == 200  # the probes carry nothing
    finally:
        proc.stop()


async def test_a_token_makes_the_host_name_free(upstream, tmp_path: Path) -> None:
    """With a token the browser cannot send it by itself: any name reaches the admin port
    (behind a load balancer, under a DNS name) with the token, as before."""
    proc = MeterProcess(["--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb")], env=clean_env(METER_ADMIN_TOKEN=TOKEN), log_path=tmp_path / "m.log")
    try:
        proc.start()
        code = await asyncio.get_running_loop().run_in_executor(None, lambda: host_request(proc.admin_port, "/metrics", "meter.internal.example", {"Authorization": f"Bearer {TOKEN}"}))
        assert code == 200
    finally:
        proc.stop()


ATTACK_PAGE = """<!doctype html><title>a page the operator opens</title><link rel="icon" href="data:,"><script>
// What any web page can do to a port on the operator's machine without reading the answer:
// a simple POST (as a form would send it) and a simple GET. The answers are opaque to it,
// but the statement runs, and how long it takes is visible (a timing oracle).
window.attack = (admin) => Promise.all([
  fetch(admin + "/api/sql", {method: "POST", mode: "no-cors", body: JSON.stringify({sql: "SELECT count(*) FROM requests"})}),
  fetch(admin + "/api/report", {method: "POST", mode: "no-cors", body: JSON.stringify({keys: {}})}),
  fetch(admin + "/api/report?by=key", {mode: "no-cors"}),
]).then(() => "sent");
</script>"""


async def test_a_tokenless_admin_refuses_cross_site_requests(upstream, tmp_path: Path) -> None:
    """Without a token the admin port is addressed as 127.0.0.1, so the loopback Host rule
    lets any web page's request through: a page on another origin posts to `/api/sql`
    (no preflight for a text/plain body) and the statement runs, its duration readable by
    the page.  The browser tells such requests apart (Sec-Fetch-Site, Origin); the console's
    own requests are same-origin and still answered, in a real chromium."""
    from aiohttp import web

    from .browser import Browser
    from .socket_server import serving

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=ATTACK_PAGE, content_type="text/html")

    site_app = web.Application()
    site_app.router.add_get("/", page)
    async with serving(site_app) as site_port:
        proc = MeterProcess(["--upstream", upstream.url, "--ledger", str(tmp_path / "l.duckdb")], env=clean_env(), log_path=tmp_path / "m.log")
        try:
            proc.start()
            admin = proc.admin_url
            async with Browser() as browser:
                # Another origin on the same machine (localhost is not 127.0.0.1 to a browser).
                await browser.goto(f"http://localhost:{site_port}/")
                assert await browser.evaluate(f"window.attack({json.dumps(admin)})") == "sent"
                deadline = time.monotonic() + 10
                while len([u for u, _ in browser.responses if u.startswith(admin)]) < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                answered = [(u.removeprefix(admin), s) for u, s in browser.responses if u.startswith(admin)]
                assert sorted(answered) == [("/api/report", 403), ("/api/report?by=key", 403), ("/api/sql", 403)], answered

                # The console itself, opened at the admin port, still reads everything.
                for origin in (admin, f"http://localhost:{proc.admin_port}"):
                    browser.problems.clear()
                    await browser.goto(origin + "/")
                    await browser.wait_for("Number(document.body.dataset.loaded || 0) >= 1")
                    assert await browser.evaluate("document.getElementById('error').hidden") is True, origin
                    assert browser.problems == [], browser.problems
            # A client that is no browser (meter report --url, Prometheus, curl) sends neither header.
            status, _, body = await araw(proc.admin_port, "/api/report")
            assert status == 200 and [row["requests"] for row in json.loads(body)] == [0]
            # What browsers send for a cross-site or cross-origin request, header by header.
            for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://attacker.example"},
                            {"Origin": "null"}, {"Origin": f"http://127.0.0.1:{site_port}"}):
                status, _, body = await araw(proc.admin_port, "/api/report", headers)
                assert status == 403 and json.loads(body)["error"]["code"] == "cross_site_request", (headers, status, body)
            for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": proc.admin_url}, {"Sec-Fetch-Site": "none"}):
                assert (await araw(proc.admin_port, "/api/report", headers))[0] == 200, headers
            # A link from another site to the console's page still opens it (the page holds no data),
            # and the probes answer anyone.
            assert (await araw(proc.admin_port, "/", {"Sec-Fetch-Site": "cross-site"}))[0] == 200
            assert (await araw(proc.admin_port, "/healthz", {"Sec-Fetch-Site": "cross-site"}))[0] == 200
        finally:
            proc.stop()
