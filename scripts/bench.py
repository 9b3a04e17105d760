#!/usr/bin/env python3
"""Benchmark: meter against a bare pass-through and a direct connection, in one run.

Starts three processes on loopback: a fast fake upstream, a bare pass-through
(meter's own forwarding with no observers, no records), and `meter serve` with
its DuckDB ledger; then drives each with wrk (Debian package `wrk`) for a
non-streaming Responses call and a streaming one with 100 deltas.  Prints
requests/s and p50/p99 latency per target, meter's share of the bare
pass-through's throughput, the latency meter adds, ledger ingest in records/s,
and meter's RSS growth over 100,000 requests.

    python scripts/bench.py [--duration 10] [--connections 32]

Everything stays on 127.0.0.1 and every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DELTAS = 100


# --- the fake upstream and the bare pass-through (run as child processes) -------


def response_json() -> bytes:
    return json.dumps(
        {
            "id": "resp_bench",
            "object": "response",
            "status": "completed",
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello there, this is a benchmark."}]}],
            "usage": {"input_tokens": 25, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 34},
        }
    ).encode()


def sse_events() -> list[bytes]:
    def ev(kind: str, data: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()

    head = {"id": "resp_bench", "object": "response", "status": "in_progress", "model": "gpt-4o-2024-08-06", "service_tier": "auto", "usage": None}
    events = [ev("response.created", {"response": head, "sequence_number": 0})]
    for i in range(DELTAS):
        events.append(ev("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "tok ", "sequence_number": i + 1}))
    final = json.loads(response_json())
    events.append(ev("response.completed", {"response": final, "sequence_number": DELTAS + 1}))
    return events


def run_upstream(port: int) -> None:
    from aiohttp import web

    body = response_json()
    events = sse_events()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        payload = await request.read()
        if b'"stream": true' in payload or b'"stream":true' in payload:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await resp.prepare(request)
                for event in events:
                    await resp.write(event)
                await resp.write_eof()
            except ConnectionResetError:  # wrk hangs up when a run ends
                pass
            return resp
        return web.Response(body=body, content_type="application/json", headers={"openai-processing-ms": "5", "x-request-id": "req_bench"})

    run_event_loop(serve_forever(handle, port, handler_cancellation=False))


def run_bare(port: int, upstream: str) -> None:
    from meter.config import load_settings
    from meter.flow import Addons
    from meter.identity import KeyIdentities
    from meter.proxy import Proxy
    from meter.server import make_session

    async def main() -> None:
        settings = load_settings({"upstream": upstream}, env={})
        proxy = Proxy(upstream, make_session(settings), Addons([]), KeyIdentities(), observe=False)
        await serve_forever(proxy.handle, port)

    run_event_loop(main())


async def serve_forever(handle, port: int, handler_cancellation: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Serve `handle` on 127.0.0.1:`port`, say READY, and never return."""
    import asyncio

    from aiohttp import web

    runner = web.ServerRunner(web.Server(handle, handler_cancellation=handler_cancellation, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


def start_meter_serve(upstream: str, port: int, admin_port: int, ledger: Path) -> subprocess.Popen:
    """`meter serve` as it runs in production: DuckDB ledger, metrics, no traces."""
    return subprocess.Popen(
        [sys.executable, "-m", "meter", "serve", "--upstream", upstream, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}",
         "--ledger", str(ledger), "--log-level", "warning"],
        cwd=ROOT,
    )


def run_event_loop(coro) -> None:  # type: ignore[no-untyped-def]
    """asyncio.run on uvloop where available, as `meter serve` runs."""
    import asyncio

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(coro)


# --- the orchestrator ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-%s"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, latency.mean))
end
"""


def wrk(url: str, stream: bool, duration: float, connections: int, workdir: Path) -> dict[str, float]:
    body = json.dumps({"model": "gpt-4o", "input": "Say hello", "stream": stream})
    script = workdir / f"wrk-{stream}.lua"
    script.write_text(WRK_SCRIPT % (body, uuid.uuid4().hex[:8]))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, int(duration))}s", "--timeout", "10s", "-s", str(script), url + "/v1/responses"],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    ).stdout
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk said:\n{out}")
    requests, duration_us, p50, p99, errors = map(int, m.groups())
    return {"rps": requests / (duration_us / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "requests": requests, "errors": errors}


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every child (meter flushes its ledger on it), then wait, killing stragglers."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: a per-request cost that other load does not skew."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ledger_ingest(n: int = 100_000) -> float:
    from meter.ledger import DuckDBStore
    from meter.record import Record

    with tempfile.TemporaryDirectory() as d:
        store = DuckDBStore(str(Path(d) / "ingest.duckdb"))
        store.open()
        records = [
            Record(
                id=str(uuid.uuid4()), started_at=time.time(), finished_at=time.time(), method="POST", path="/v1/responses", endpoint="responses",
                status_code=200, model="gpt-4o", response_id=f"resp_{i}", input_tokens=100, output_tokens=20, total_tokens=120,
                key_id="0123456789abcdef", key_hint="sk-...abcd", ttfb_ms=10.0, duration_ms=100.0,
            )
            for i in range(n)
        ]
        t0 = time.perf_counter()
        for i in range(0, n, 5000):
            store.write(records[i : i + 5000])
        elapsed = time.perf_counter() - t0
        store.close()
    return n / elapsed


def budget_check_cost(n: int = 200_000) -> dict[str, float]:
    """The budget check on the request path, in-process (us per request): the `admit`
    hook through the addon registry, as the proxy calls it, with enforcing budgets:
    none reached; one reached that names another key; two reached that read the
    body's model and tags (parsed beforehand: the record reads the same facts later,
    so the check moves that parse earlier rather than adding it; its cost is given
    on its own).  And what the budgets add to each finished record (`done`)."""
    from decimal import Decimal

    from meter.budgets.gate import BudgetGate
    from meter.budgets.spend import Budgets
    from meter.config import Budget
    from meter.flow import Addons, Flow
    from meter.identity import KeyIdentities, key_id
    from meter.observe import request_facts
    from meter.record import Record

    key = "sk-bench-0123456789abcdefghijklmnop"
    budgets = [
        Budget(name="team", match={"key": "team-search"}, window="month", limit_usd=Decimal(500), mode="enforce"),
        Budget(name="feature", match={"tag:feature": "autocomplete", "model": "gpt-4o"}, window="day", limit_usd=Decimal(50), mode="enforce"),
        Budget(name="all-gpt-4o", match={"model": "gpt-4o"}, window="week", limit_usd=Decimal(5000), mode="enforce"),
    ]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"model": "gpt-4o-mini", "input": "hi", "metadata": {"feature": "chat"}}).encode()

    def reached(chosen: list[Budget]) -> Budgets:
        state = Budgets(chosen, {})
        for one in state.states:
            one.others = one.limit  # what a sync would find
        state.blocked = tuple(state.states)
        return state

    def per_request(state: Budgets) -> float:
        registry = Addons([BudgetGate(state, KeyIdentities({key_id("sk-other"): "team-search"}))])
        flow = Flow(method="POST", path="/v1/responses", endpoint="responses", headers=headers, request_body=body)
        flow.request_facts()
        admit = registry.admit
        t0 = time.perf_counter()
        for _ in range(n):
            admit(flow)
        return (time.perf_counter() - t0) / n * 1e6

    out = {
        "no budget reached": per_request(Budgets(budgets, {})),
        "a reached budget names another key": per_request(reached(budgets[:1])),
        "two reached budgets read model and tags": per_request(reached(budgets[1:])),
    }
    t0 = time.perf_counter()
    for _ in range(n // 10):
        request_facts(body)
    out["(the body's facts, parsed earlier than without budgets)"] = (time.perf_counter() - t0) / (n // 10) * 1e6
    now = time.time()
    records = [
        Record(id=None, started_at=now, finished_at=now, method="POST", path="/v1/responses", endpoint="responses", key_id="0123456789abcdef", model_requested="gpt-4o", cost_usd=Decimal("0.0001"))
        for _ in range(n // 10)
    ]
    counting = Budgets(budgets, {})
    t0 = time.perf_counter()
    for record in records:
        counting.add(record)
    out["done, per finished record"] = (time.perf_counter() - t0) / len(records) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["upstream", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections for throughput (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target; medians are reported (default 3)")
    parser.add_argument("--memory-requests", type=int, default=100_000, help="requests for the RSS check (default 100000)")
    parser.add_argument("--budget-check", action="store_true", help="only measure the budget check's cost per request, in-process, and exit")
    args = parser.parse_args()
    if args.budget_check:
        for case, us in budget_check_cost().items():
            print(f"budget check, {case}: {us:.3f} us")
        return None
    if args.role == "upstream":
        return run_upstream(args.port)
    if args.role == "bare":
        return run_bare(args.port, args.upstream)
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (apt-get install wrk)")

    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="meter-bench-"))
    try:
        up_port, bare_port, meter_port, admin_port = free_port(), free_port(), free_port(), free_port()
        up = f"http://127.0.0.1:{up_port}"
        procs.append(subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(up_port)]))
        wait_port(up_port)
        procs.append(subprocess.Popen([sys.executable, __file__, "--role", "bare", "--port", str(bare_port), "--upstream", up]))
        meter = start_meter_serve(up, meter_port, admin_port, work / "bench.duckdb")
        procs.append(meter)
        wait_port(bare_port)
        wait_port(meter_port)
        targets = {"direct": up, "bare": f"http://127.0.0.1:{bare_port}", "meter": f"http://127.0.0.1:{meter_port}"}
        pids = {"direct": procs[0].pid, "bare": procs[1].pid, "meter": meter.pid}
        results: dict[tuple[str, str], dict[str, float]] = {}
        for stream in (False, True):
            kind = "stream (100 deltas)" if stream else "json"
            for url in targets.values():
                wrk(url, stream, 2, args.connections, work)  # warm-up
            # Interleaved rounds, medians: one run on a small machine is at the mercy of
            # whatever else ran in that second; bare and meter see the same conditions.
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    cpu0 = cpu_seconds(pids[name])
                    thr = wrk(url, stream, args.duration, args.connections, work)
                    cpu_us = (cpu_seconds(pids[name]) - cpu0) / max(thr["requests"], 1) * 1e6
                    lat = wrk(url, stream, max(2.0, args.duration / 2), 1, work)
                    runs[name].append({"cpu_us": cpu_us, "rps": thr["rps"], "errors": thr["errors"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                                       "p50_loaded_ms": thr["p50_ms"], "p99_loaded_ms": thr["p99_ms"]})
            for name in targets:
                r = {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
                results[(kind, name)] = r
                print(f"  {kind:20} {name:7} {r['rps']:9.0f} req/s  {r['cpu_us']:7.0f} us CPU/req  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  (errors {r['errors']:.0f})", flush=True)

        # Memory: RSS before and after at least --memory-requests more requests through meter.
        before = rss_kb(meter.pid)
        sent = 0
        deadline = time.monotonic() + 600
        while sent < args.memory_requests and time.monotonic() < deadline:
            sent += int(wrk(targets["meter"], False, 10, args.connections, work)["requests"])
        time.sleep(1.5)
        after = rss_kb(meter.pid)
        ingest = ledger_ingest()
        budget = budget_check_cost()

        print()
        print("| call | target | req/s | CPU us/req (that process) | p50 ms (1 conn) | p99 ms (1 conn) | p50 ms (loaded) | p99 ms (loaded) |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for (kind, name), r in results.items():
            print(f"| {kind} | {name} | {r['rps']:.0f} | {r['cpu_us']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_loaded_ms']:.2f} | {r['p99_loaded_ms']:.2f} |")
        print()
        for kind in ("json", "stream (100 deltas)"):
            bare, met = results[(kind, "bare")], results[(kind, "meter")]
            print(f"{kind}: meter at {100 * met['rps'] / bare['rps']:.1f}% of the bare pass-through's req/s "
                  f"(CPU per request: meter {met['cpu_us']:.0f} us, bare {bare['cpu_us']:.0f} us, ratio {100 * bare['cpu_us'] / met['cpu_us']:.1f}%); "
                  f"p50 added over bare {met['p50_ms'] - bare['p50_ms']:+.2f} ms")
        print(f"ledger ingest: {ingest:,.0f} records/s")
        print("budget check, in-process: " + "; ".join(f"{case} {us:.2f} us" for case, us in budget.items()))
        print(f"meter RSS: {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB after {sent:,} more requests ({(after - before) / 1024:+.1f} MiB)")
    finally:
        stop_processes(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
