"""Hostile load: hundreds of slow uploads and stalled connections, and clients that
read nothing of a large stream, must neither starve normal clients nor grow meter's
memory past a bound set by its settings (SPEC §2b).

A real `meter serve` (default settings but `--client-timeout 2`) sits in front of
a real upstream process defined below, which streams a 32 MiB answer to whoever
asks for `"stream": true`: produced lazily, so only meter could hold it.  At the
same time:

- 300 slow uploads: headers declaring a 1 MiB body, a few bytes a second for a
  few seconds, then silence: each must get `408` (or `503` from the request
  buffer budget) soon after `--client-timeout`, with a row;
- 300 stalled connections: half a request line, then nothing;
- 50 clients that send a streaming request and then read nothing;
- 2 clients that read a gzip answer inflating to 256 MiB, 4x `--max-metered-bytes`;
- a normal client that keeps making requests, which must keep succeeding quickly.

meter's memory is read from /proc (VmRSS sampled, VmHWM at the end) for
`meter serve` and its ledger child.  A second test holds the ledger queue to its
bound while the store (PostgreSQL) is down: records of clients that send 2 MiB
`user` and metadata values wait with their text cut, not in full.

Run as a script this module is the upstream:
`python -m tests.test_hostile_load --port 0` prints `READY <url>`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import socket
import statistics
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .conftest import SECRET_KEY, UpstreamProcess, ledger_rows

CLIENT_TIMEOUT = 2.0  # --client-timeout given to meter
SLOW_UPLOADS = 300
STALLED = 300
NON_READERS = 50
SLOW_DECLARED = 1 << 20  # Content-Length each slow upload declares
TRICKLE_SECONDS = 3  # a few bytes each second for this long, then silence
STREAM_BYTES = 32 << 20  # size of the answer the non-readers ask for
DELTA = "z" * 8000  # text of each streamed delta event
BOMBS = 2  # clients that read, whole, a gzip answer inflating to BOMB_INFLATED
BOMB_INFLATED = 256 << 20  # 4x the cap: holding it whole would show at once
MAX_METERED_MIB = 64  # meter's default --max-metered-bytes: what it may hold of one answer

# What each kind of connection may cost meter, measured with this test on 2 cores
# (uvloop, glibc malloc) and rounded up: a connection that has sent part of a
# request holds a parser and a few small buffers (~4 KiB stalled, ~11 KiB
# uploading); one whose client reads nothing of a stream holds what aiohttp read
# from the upstream before pausing (~256 KiB) plus allocator slack, ~1.75 MiB RSS,
# and stays there however long the stream.  The bound is those figures plus room
# for the normal traffic; buffering a declared body or the unread stream would
# pass it many times over (300 MiB, 1.6 GiB).
IDLE_CONNECTION_KIB = 32
NON_READER_MIB = 2.5
METERED_COPY_MIB = MAX_METERED_MIB * 1.25  # the capped copy, plus the chunk being inflated
SLACK_MIB = 24
MAX_CHILD_GROWTH_MIB = 64  # the ledger child: DuckDB and one batch at a time
MAX_NORMAL_LATENCY_S = 5.0  # any one normal request
MAX_NORMAL_MEDIAN_S = 0.5


# --- the upstream, run as its own process ---------------------------------------


def _sse(kind: str, payload: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **payload}).encode() + b"\n\n"


def _response(model: str, status: str) -> dict:
    usage = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    return {"id": "resp_" + os.urandom(16).hex(), "object": "response", "status": status, "model": model, "output": [], "usage": usage if status == "completed" else None}


@functools.cache
def _bomb() -> bytes:
    """A JSON answer with usage, gzipped: ~1 MiB on the wire, BOMB_INFLATED bytes inflated."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    answer = _response("hostile-bomb", "completed")
    head, tail = json.dumps({**answer, "output_text": ""}).encode().split(b'"output_text": ""')
    parts = [packer.compress(head + b'"output_text": "')]
    block = b"a" * (1 << 20)
    parts += [packer.compress(block) for _ in range(BOMB_INFLATED >> 20)]
    parts += [packer.compress(b'"' + tail), packer.flush()]
    return b"".join(parts)


@functools.cache
def _big_json() -> bytes:
    """A plain JSON answer with usage, BIG_ANSWER bytes: just under --max-metered-bytes."""
    answer = _response("hostile-big", "completed")
    return json.dumps({**answer, "output_text": "a" * (BIG_ANSWER - 400)}).encode()


async def _upstream_handle(request: web.BaseRequest) -> web.StreamResponse:
    body = json.loads(await request.content.read() or b"{}")  # any size: meter, not this fake, sets the limit
    model = str(body.get("model", "m"))
    if model == "hostile-big":
        return web.Response(body=_big_json(), headers={"Content-Type": "application/json"})
    if model == "hostile-bomb":
        return web.Response(body=_bomb(), headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    if not body.get("stream"):
        return web.json_response(_response(model, "completed"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    created = _response(model, "in_progress")
    await resp.write(_sse("response.created", {"response": created}))
    delta = _sse("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": DELTA})
    sent = 0
    try:
        while sent < STREAM_BYTES:  # each write waits while meter does not read: nothing piles up here
            await resp.write(delta)
            sent += len(delta)
        await resp.write(_sse("response.completed", {"response": {**_response(model, "completed"), "id": created["id"]}}))
        await resp.write_eof()
    except ConnectionError:  # meter's client went away and meter with it: expected here
        pass
    return resp


async def _serve_upstream(port: int) -> None:
    runner = web.ServerRunner(web.Server(_upstream_handle), handle_signals=True, access_log=None)
    await runner.setup()
    _bomb()  # made before READY, so no test waits on it
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    await web.SockSite(runner, sock, backlog=1024).start()
    print(f"READY http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


# --- reading meter's memory ------------------------------------------------------


def _status_kib(pid: int, field_name: str) -> int:
    """A VmRSS / VmHWM line of /proc/<pid>/status, in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:  # field 4, after the command in parentheses
                found.append(int(entry))
    return found


@dataclass
class Memory:
    meter_pid: int
    child_pids: list[int]
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, meter KiB, children KiB)

    def sample(self) -> tuple[int, int]:
        rss = _status_kib(self.meter_pid, "VmRSS"), sum(_status_kib(p, "VmRSS") for p in self.child_pids)
        self.samples.append((time.monotonic(), *rss))
        return rss

    def hwm(self) -> tuple[int, int]:
        return _status_kib(self.meter_pid, "VmHWM"), sum(_status_kib(p, "VmHWM") for p in self.child_pids)

    async def sample_every(self, interval: float) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)


# --- the clients -----------------------------------------------------------------


def _head(method: str, length: int | None, extra: str = "") -> bytes:
    lines = [f"{method} /v1/responses HTTP/1.1", "Host: meter", f"Authorization: Bearer {SECRET_KEY}", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def _connect(port: int, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the window stays small: the stall reaches meter sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


@dataclass
class Answer:
    status: int | None = None
    body: bytes = b""
    after_last_byte: float | None = None  # seconds from the last byte sent to the status line
    write_failed: bool = False


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def slow_upload(port: int, deadline: float) -> Answer:
    """Declares 1 MiB, sends a few bytes a second, then goes silent; waits for meter's answer."""
    answer = Answer()
    reader, writer = await _connect(port)
    try:
        reading = asyncio.ensure_future(_read_answer(reader))
        writer.write(_head("POST", SLOW_DECLARED) + b'{"model": "hostile-slow", "input": "')
        last = time.monotonic()
        for _ in range(TRICKLE_SECONDS):
            done, _ = await asyncio.wait([reading], timeout=1.0)
            if done:
                break
            try:
                writer.write(b"abcd")
                await writer.drain()
                last = time.monotonic()
            except ConnectionError:
                answer.write_failed = True
                break
        try:
            status, body = await asyncio.wait_for(reading, max(0.1, deadline - time.monotonic()))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, IndexError, ValueError):
            return answer
        answer.status, answer.body, answer.after_last_byte = status, body, time.monotonic() - last
        return answer
    finally:
        writer.transport.abort()


async def stalled(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _connect(port)
    writer.write(b"POST /v1/respo")  # half a request line, then nothing
    return reader, writer


async def non_reader(port: int) -> asyncio.StreamWriter:
    """Asks for the large stream and reads none of it."""
    _reader, writer = await _connect(port, rcvbuf=16384)
    writer.transport.pause_reading()
    body = json.dumps({"model": "hostile-stream", "input": "x", "stream": True}).encode()
    writer.write(_head("POST", len(body)) + body)
    return writer


async def bomb(url: str) -> tuple[int, bool]:
    """Reads, whole and compressed, an answer that inflates past --max-metered-bytes:
    its status, and whether it arrived whole."""
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Accept-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)) as s,
        s.post(url + "/v1/responses", json={"model": "hostile-bomb", "input": "x"}, headers=headers) as r,
    ):
        body = await r.read()
        return r.status, r.headers.get("Content-Encoding") == "gzip" and len(body) == int(r.headers["Content-Length"])


@dataclass
class NormalClient:
    url: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ok: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {SECRET_KEY}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    async with s.post(self.url + "/v1/responses", json={"model": "normal", "input": "hi"}, headers=headers) as r:
                        data = await r.json()
                        if r.status == 200 and data.get("usage"):
                            self.ok += 1
                        else:
                            self.failures.append(f"{r.status} {data}")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.monotonic() - t)
                await asyncio.sleep(0.02)


# --- the test ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def streaming_upstream() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess(module="tests.test_hostile_load").start()
    yield proc
    proc.stop()


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for ~700 sockets here and in meter (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


async def _settle_children(meter_pid: int) -> list[int]:
    for _ in range(100):
        found = _children(meter_pid)
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError("meter serve has no ledger child")


async def _until_counted(admin_url: str, outcome: str, n: int) -> None:
    """Until meter_requests_total counts `n` requests of `outcome`."""
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(admin_url + "/metrics") as r:
                lines = (await r.text()).splitlines()
            counted = sum(float(line.split()[-1]) for line in lines if line.startswith("meter_requests_total{") and f'outcome="{outcome}"' in line)
            if counted >= n:
                return
            assert time.monotonic() < deadline, f"{counted:.0f} of {n} requests counted {outcome}"
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_hostile_load_keeps_meter_responsive_and_bounded(streaming_upstream, meter_process, many_files, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.duckdb"
    meter = meter_process("--upstream", streaming_upstream.url, "--ledger", str(ledger), "--client-timeout", str(CLIENT_TIMEOUT))
    assert meter.proc is not None
    port = meter.port
    memory = Memory(meter.proc.pid, await _settle_children(meter.proc.pid))

    warm = NormalClient(meter.url)
    stop_warm = asyncio.Event()
    warming = asyncio.ensure_future(warm.run(stop_warm))
    await asyncio.sleep(2.0)
    stop_warm.set()
    await warming
    assert warm.ok > 10 and not warm.failures, warm.failures[:3]
    base_meter, base_child = memory.sample()
    report: dict[str, object] = {"baseline_mib": (_mib(base_meter), _mib(base_child))}

    normal = NormalClient(meter.url)
    stop_normal = asyncio.Event()
    normal_task = asyncio.ensure_future(normal.run(stop_normal))
    sampler = asyncio.ensure_future(memory.sample_every(0.1))
    held: list[asyncio.StreamWriter] = []
    try:
        stalls = await asyncio.gather(*(stalled(port) for _ in range(STALLED)))
        held += [w for _, w in stalls]
        await asyncio.sleep(1.0)
        report["with_stalled_mib"] = tuple(map(_mib, memory.sample()))

        readers = await asyncio.gather(*(non_reader(port) for _ in range(NON_READERS)))
        held += readers
        bombs = await asyncio.gather(*(bomb(meter.url) for _ in range(BOMBS)))
        await asyncio.sleep(1.0)
        report["with_non_readers_and_bombs_mib"] = tuple(map(_mib, memory.sample()))

        deadline = time.monotonic() + TRICKLE_SECONDS + CLIENT_TIMEOUT + 8.0
        uploads = asyncio.ensure_future(asyncio.gather(*(slow_upload(port, deadline) for _ in range(SLOW_UPLOADS))))
        await asyncio.sleep(TRICKLE_SECONDS - 0.5)
        report["with_slow_uploads_mib"] = tuple(map(_mib, memory.sample()))
        answers = await uploads
        await asyncio.sleep(0.5)
        report["stalled_closed_by_meter"] = sum(1 for r, _ in stalls if r.at_eof() or r.exception() is not None)
    finally:
        stop_normal.set()
        await normal_task
        sampler.cancel()
        hwm_meter, hwm_child = memory.hwm()
        for w in held:
            w.transport.abort()
    await _until_counted(meter.admin_url, "client_disconnected", NON_READERS)  # meter notices the non-readers are gone and records them
    meter.stop()

    peak_meter = max(s[1] for s in memory.samples)
    peak_child = max(s[2] for s in memory.samples)
    statuses: dict[object, int] = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    lat = sorted(normal.latencies)
    report.update(
        peak_rss_mib=(_mib(peak_meter), _mib(peak_child)),
        vmhwm_mib=(_mib(hwm_meter), _mib(hwm_child)),
        normal_ok=normal.ok,
        normal_median_s=round(statistics.median(lat), 3) if lat else None,
        normal_max_s=round(lat[-1], 3) if lat else None,
        slow_upload_statuses=statuses,
        slow_408_after_last_byte_s=round(max((a.after_last_byte or 0) for a in answers if a.status == 408), 2) if statuses.get(408) else None,
    )
    print("HOSTILE LOAD", json.dumps(report, default=str), file=sys.stderr)

    # Normal clients are served, and quickly, throughout; the gzip answers reach their clients as sent.
    assert bombs == [(200, True)] * BOMBS
    assert not normal.failures, normal.failures[:5]
    assert normal.ok >= 20
    assert lat[-1] <= MAX_NORMAL_LATENCY_S and statistics.median(lat) <= MAX_NORMAL_MEDIAN_S, report
    # Memory grows by connections and buffers meter bounds, not by what clients declare or leave unread.
    bound_mib = NON_READERS * NON_READER_MIB + (STALLED + SLOW_UPLOADS) * IDLE_CONNECTION_KIB / 1024 + BOMBS * METERED_COPY_MIB + SLACK_MIB
    assert (hwm_meter - base_meter) / 1024 <= bound_mib, report
    assert (hwm_child - base_child) / 1024 <= MAX_CHILD_GROWTH_MIB, report
    # Every slow upload is answered once --client-timeout of silence has passed: 408,
    # or 503 when the request buffer budget refused it first; an OpenAI-shaped body either way.
    assert statuses.get(408, 0) + statuses.get(503, 0) == SLOW_UPLOADS, report
    assert statuses.get(408, 0) > 0, report
    for a in answers:
        assert "error" in json.loads(a.body), a.body[:200]
        if a.status == 408:
            assert a.after_last_byte is not None and a.after_last_byte <= CLIENT_TIMEOUT + 3.0, report

    # Every answered request has its row.
    rows = ledger_rows(ledger)
    by_model = {m: [r for r in rows if r["model_requested"] == m] for m in ("normal", "hostile-stream", "hostile-bomb")}
    assert len(by_model["hostile-bomb"]) == BOMBS and all(r["status_code"] == 200 for r in by_model["hostile-bomb"])
    assert len(by_model["normal"]) == warm.ok + normal.ok
    assert all(r["status_code"] == 200 and r["input_tokens"] == 7 for r in by_model["normal"])
    assert len(by_model["hostile-stream"]) == NON_READERS
    assert all(r["status_code"] == 200 and r["outcome"] == "client_disconnected" for r in by_model["hostile-stream"])
    refused = [r for r in rows if r["status_code"] in (408, 503)]
    assert len(refused) == SLOW_UPLOADS
    assert all(r["outcome"] == "error" for r in refused)


# --- one metered answer just under the cap ------------------------------------------

BIG_ANSWER = 60 << 20
# Read whole and decoded for its usage: the chunks, their join, and the decoded text.
METERED_ANSWER_FACTOR = 3
METERED_ANSWER_SLACK_MIB = 24


async def test_a_metered_answer_under_the_cap_costs_at_most_three_copies(streaming_upstream, meter_process) -> None:
    """The README's per-answer term: an answer meter may meter in full (under
    --max-metered-bytes) is held while it arrives and decoded once at its end."""
    meter = meter_process("--upstream", streaming_upstream.url, "--ledger", ":memory:")
    assert meter.proc is not None
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(meter.url + "/v1/responses", json={"model": "warm", "input": "x"}, headers=headers) as r:
            assert r.status == 200
        await asyncio.sleep(0.5)
        before = _status_kib(meter.proc.pid, "VmRSS")
        async with http.post(meter.url + "/v1/responses", json={"model": "hostile-big", "input": "x"}, headers=headers) as r:
            body = await r.read()
        await asyncio.sleep(0.5)
        async with http.get(meter.admin_url + "/metrics") as m:
            metrics = await m.text()
    growth_mib = (_status_kib(meter.proc.pid, "VmHWM") - before) / 1024
    print("BIG ANSWER", json.dumps({"answer_mib": BIG_ANSWER >> 20, "growth_mib": round(growth_mib, 1)}), file=sys.stderr)
    assert r.status == 200 and len(body) == len(_big_json())
    # It was metered: its usage reached the counters.
    assert any(line.startswith("meter_tokens_total{") and 'model="hostile-big"' in line for line in metrics.splitlines()), "the big answer was not metered"
    assert growth_mib <= METERED_ANSWER_FACTOR * (BIG_ANSWER >> 20) + METERED_ANSWER_SLACK_MIB


# --- the ledger queue while the store is down --------------------------------------

BIG_TEXT_REQUESTS = 50
BIG_TEXT_CHARS = 2 << 20  # each request's `user`, and its one metadata value
QUEUE_GROWTH_MIB = 48  # 50 records with every text at its cap are well under 10 MiB


async def test_queued_records_hold_capped_text_while_the_store_is_down(streaming_upstream, postgres, meter_process) -> None:
    """While the ledger is down, what waits in the queue is bounded by --ledger-max-pending
    records of bounded size: a client's 2 MiB `user` or metadata value must not wait in
    full.  (The upstream need not accept them: a refused request gets its row too.)"""
    url = postgres.new_database()
    meter = meter_process("--upstream", streaming_upstream.url, "--ledger", url)
    assert meter.proc is not None
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async def send(body: bytes) -> int:
            async with http.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
                await r.read()
                return r.status

        assert [await send(b'{"model": "warm", "input": "x"}') for _ in range(20)] == [200] * 20
        await asyncio.sleep(1.0)
        before = _status_kib(meter.proc.pid, "VmRSS")
        postgres.stop()
        try:
            big = "u" * BIG_TEXT_CHARS
            statuses = []
            for i in range(BIG_TEXT_REQUESTS):
                # Each request's text is its own, as a client's would be.
                body = json.dumps({"model": "m", "user": f"{i}{big}", "metadata": {"k": f"{i}{big}"}, "input": "x"}).encode()
                statuses.append(await send(body))
            await asyncio.sleep(1.5)  # past a flush interval: the writer has tried, and failed
            async with http.get(meter.admin_url + "/metrics") as r:
                pending = next(float(line.split()[-1]) for line in (await r.text()).splitlines() if line.startswith("meter_ledger_pending_records "))
            after = _status_kib(meter.proc.pid, "VmRSS")
        finally:
            postgres.start()
    growth_mib = (after - before) / 1024
    print("QUEUE", json.dumps({"before_mib": _mib(before), "after_mib": _mib(after), "pending": pending}), file=sys.stderr)
    assert statuses == [200] * BIG_TEXT_REQUESTS
    assert pending >= BIG_TEXT_REQUESTS  # the records really are waiting
    assert growth_mib <= QUEUE_GROWTH_MIB, f"{BIG_TEXT_REQUESTS} records waiting for the ledger grew meter by {growth_mib:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description="The upstream of tests/test_hostile_load.py")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve_upstream(args.port))


if __name__ == "__main__":
    main()
