#!/usr/bin/env python3
"""Benchmark: meter against a bare pass-through, peers and a direct connection, in one run.

Starts, on loopback, a fast fake upstream (every answer with a response id of
its own, as real traffic has), a bare pass-through (meter's own forwarding with
no observers and no records) on uvloop and on asyncio, and `meter serve` on its
defaults (DuckDB ledger, metrics; uvloop); with `--peers litellm,portkey` also
LiteLLM's proxy and Portkey's gateway (installed on demand into a cache, see
scripts/peers.py).  It drives each with wrk, a non-streaming Responses call and
a streaming one (`--deltas` output deltas), in `--rounds` interleaved rounds:

- throughput: 32 connections flat out; requests/s and CPU per request of the
  target's whole process tree (meter: the proxy and its ledger process; the
  proxy's own share is given too) and the latency it shows when saturated;
- latency at one connection: p50 and p99;
- latency at 32 connections paced to `--paced-rate` requests/s in all (the same
  offered load for every target, below their saturation): p50 and p99.

Every figure of meter is also given as a ratio to the bare pass-through on the
same event loop, taken within each round (seconds apart, so this machine's drift
cancels) with its median and min-max over rounds.  Then each target's peak RSS
(its process tree), meter's RSS every 100,000 requests over `--memory-requests`
more, that the ledger holds a row for every request once meter has stopped on
SIGTERM, ledger ingest, and the budget check's cost in-process.
`scripts/bench_metering.py` itemises metering's own CPU per call.

    python scripts/bench.py [--duration 10] [--rounds 3] [--peers litellm,portkey] [--pin]

`--pin` is the issue's setup: each target alone on CPU 0; wrk, the fake
upstream, this script and meter's ledger process on CPU 1 (unpinned, everything
shares both cores and the tail shows it).

Everything stays on 127.0.0.1 and every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import itertools
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
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DELTAS = 100
RESPONSE_ID = b"resp_bench"  # what the answers below carry; the upstream numbers it per answer


# --- the fake upstream and the bare pass-through (run as child processes) -------


def response_json() -> bytes:
    return json.dumps(
        {
            "id": RESPONSE_ID.decode(),
            "object": "response",
            "created_at": 1780000000,  # LiteLLM rebuilds the answer and fails (500) without it
            "status": "completed",
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello there, this is a benchmark."}]}],
            "usage": {"input_tokens": 25, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 34},
        }
    ).encode()


def sse_events(deltas: int = DELTAS) -> list[bytes]:
    def ev(kind: str, data: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()

    head = {"id": RESPONSE_ID.decode(), "object": "response", "created_at": 1780000000, "status": "in_progress", "model": "gpt-4o-2024-08-06", "service_tier": "auto", "usage": None}
    events = [ev("response.created", {"response": head, "sequence_number": 0})]
    for i in range(deltas):
        events.append(ev("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "tok ", "sequence_number": i + 1}))
    final = json.loads(response_json())
    events.append(ev("response.completed", {"response": final, "sequence_number": deltas + 1}))
    return events


def run_upstream(port: int, deltas: int) -> None:
    from aiohttp import web

    # Each answer gets an id of its own: meter counts a response id's usage once, so
    # one id for every answer would leave all but the first unpriced (less work).
    body_parts = response_json().split(RESPONSE_ID)
    events = sse_events(deltas)
    first_parts, last_parts, middle = events[0].split(RESPONSE_ID), events[-1].split(RESPONSE_ID), events[1:-1]
    numbers = itertools.count()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        payload = await request.read()
        rid = b"resp_%d" % next(numbers)
        if b'"stream": true' in payload or b'"stream":true' in payload:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await resp.prepare(request)
                await resp.write(rid.join(first_parts))
                for event in middle:
                    await resp.write(event)
                await resp.write(rid.join(last_parts))
                await resp.write_eof()
            except ConnectionResetError:  # wrk hangs up when a run ends
                pass
            return resp
        return web.Response(body=rid.join(body_parts), content_type="application/json", headers={"openai-processing-ms": "5", "x-request-id": "req_bench"})

    run_event_loop(serve_forever(handle, port, handler_cancellation=False))


def run_bare(port: int, upstream: str, loop: str) -> None:
    from meter.config import load_settings
    from meter.flow import Addons
    from meter.identity import KeyIdentities
    from meter.proxy import Proxy
    from meter.server import make_session

    async def main() -> None:
        settings = load_settings({"upstream": upstream}, env={})
        proxy = Proxy(upstream, make_session(settings), Addons([]), KeyIdentities(), observe=False)
        await serve_forever(proxy.handle, port)

    run_event_loop(main(), uvloop=loop == "uvloop")


async def serve_forever(handle: Callable[[Any], Awaitable[Any]], port: int, handler_cancellation: bool = True) -> None:
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


def run_event_loop(coro: Coroutine[Any, Any, None], uvloop: bool = True) -> None:
    """asyncio.run, on uvloop (as `meter serve` runs) unless told otherwise."""
    import asyncio

    if uvloop:
        import uvloop as uv

        with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


# --- measuring -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# `delay` paces each connection (ms between a response and the next request); it is
# left out when running flat out.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-%(key)s"
%(headers)s
%(delay)s
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


ANSWERED: dict[str, int] = {}  # per target URL, requests answered over the whole run
LOAD_CPUS: set[int] | None = None  # with --pin: where wrk runs (the targets' core is left to them)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` and of the processes under it onto `cpus` (an affinity is
    per thread, and threads started later inherit their creator's)."""
    for proc in process_tree(pid):
        for task in Path(f"/proc/{proc}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that ended meanwhile


def wrk(url: str, stream: bool, duration: float, connections: int, workdir: Path, headers: dict[str, str] | None = None,
        pace_ms: float | None = None) -> dict[str, float]:
    body = json.dumps({"model": "gpt-4o", "input": "Say hello", "stream": stream})
    script = workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    script.write_text(WRK_SCRIPT % {
        "body": body,
        "key": uuid.uuid4().hex[:8],
        "headers": "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in (headers or {}).items()),
        "delay": f"delay = function() return {pace_ms:.3f} end" if pace_ms else "",
    })
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, int(duration))}s", "--timeout", "10s", "-s", str(script), url + "/v1/responses"],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        preexec_fn=(lambda: os.sched_setaffinity(0, LOAD_CPUS)) if LOAD_CPUS else None,
    ).stdout
    script.unlink()
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk said:\n{out}")
    requests, duration_us, p50, p99, errors = map(int, m.groups())
    ANSWERED[url] = ANSWERED.get(url, 0) + requests
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


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: a per-request cost that other load does not skew."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it (meter's ledger process, a peer's workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                pass
    tree, todo = [], [pid]
    while todo:
        one = todo.pop()
        tree.append(one)
        todo += parents.get(one, [])
    return tree


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for one in process_tree(pid):
        try:
            total += cpu_seconds(one)
        except OSError:
            pass  # ended meanwhile
    return total


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tree_parts_kb(pid: int, field: str) -> list[int]:
    """VmRSS or VmHWM of each process of the tree, the root first."""
    parts = []
    for one in process_tree(pid):
        try:
            parts.append(status_kb(one, field))
        except OSError:
            pass
    return parts


def tree_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) summed over the process tree; the sum of peaks is an
    upper bound on the tree's peak."""
    return sum(tree_parts_kb(pid, field))


# --- the run ---------------------------------------------------------------------

KINDS = ("json", "stream")
MEASURES = ("rps", "cpu_us", "proxy_cpu_us", "p50_ms", "p99_ms", "paced_p50_ms", "paced_p99_ms", "sat_p50_ms", "sat_p99_ms", "errors")


def ledger_settled(admin_url: str, timeout: float = 60) -> float:
    """Seconds until meter's ledger has written every record it was handed
    (`meter_ledger_pending_records` 0 on its /metrics)."""
    import urllib.request

    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(r"^meter_ledger_pending_records (\S+)$", text, re.MULTILINE)
        if m and float(m.group(1)) == 0:
            break
        time.sleep(0.05)
    return time.monotonic() - began


SETTLED: list[float] = []  # how long meter's ledger took to catch up after each flat-out run


def measure(url: str, pid: int, stream: bool, args: argparse.Namespace, work: Path, headers: dict[str, str],
            admin_url: str | None = None) -> dict[str, float]:
    cpu0, proxy0 = tree_cpu_seconds(pid), cpu_seconds(pid)
    thr = wrk(url, stream, args.duration, args.connections, work, headers)
    done = max(thr["requests"], 1)
    if admin_url is not None:
        # The latency runs measure meter at rest, not meter writing the backlog of the
        # flat-out run just before (seconds of records at saturation); how long that
        # backlog took is reported, and its CPU is counted in this run's CPU per request.
        SETTLED.append(ledger_settled(admin_url))
    cpu_us = (tree_cpu_seconds(pid) - cpu0) / done * 1e6
    proxy_us = (cpu_seconds(pid) - proxy0) / done * 1e6
    # Every target then rests as long before its latency runs: what a saturating run
    # leaves behind (meter's ledger checkpointing what it just wrote, freed memory)
    # is not what one connection at rest meets.
    time.sleep(args.rest)
    one = wrk(url, stream, max(2.0, args.duration / 2), 1, work, headers)
    rate = args.paced_rate / (4 if stream else 1)
    paced = wrk(url, stream, max(2.0, args.duration / 2), args.connections, work, headers, pace_ms=1000 * args.connections / rate)
    return {"rps": thr["rps"], "cpu_us": cpu_us, "proxy_cpu_us": proxy_us, "p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"],
            "paced_p50_ms": paced["p50_ms"], "paced_p99_ms": paced["p99_ms"], "sat_p50_ms": thr["p50_ms"], "sat_p99_ms": thr["p99_ms"],
            "errors": thr["errors"] + one["errors"] + paced["errors"]}


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """Median and min-max over rounds."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))} to {fmt(max(values))})"


def ratios(runs: dict[str, list[dict[str, float]]], name: str, base: str) -> dict[str, list[float]]:
    """Per round, `name` against `base` (same round, seconds apart)."""
    out: dict[str, list[float]] = {key: [] for key in ("rps", "cpu", "p50", "p99", "paced_p50", "paced_p99", "sat_p99")}
    for mine, theirs in zip(runs[name], runs[base]):
        out["rps"].append(100 * mine["rps"] / theirs["rps"])
        out["cpu"].append(100 * theirs["cpu_us"] / mine["cpu_us"])
        for key in ("p50", "p99", "paced_p50", "paced_p99", "sat_p99"):
            out[key].append(mine[f"{key}_ms"] - theirs[f"{key}_ms"])
    return out


def ledger_rows(path: Path) -> int:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return int(con.execute("SELECT count(*) FROM requests").fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["upstream", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections for throughput and paced latency (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians and ranges are reported (default 3)")
    parser.add_argument("--deltas", type=int, default=50, help="output deltas in a streamed answer (default 50)")
    parser.add_argument("--paced-rate", type=float, default=2000, help="requests/s offered in all for paced latency (streams: a quarter) (default 2000)")
    parser.add_argument("--memory-requests", type=int, default=1_000_000, help="requests for meter's RSS check (default 1000000; 0 skips it)")
    parser.add_argument("--peers", default="", help="also measure these peers: litellm,portkey (installed on demand, see scripts/peers.py)")
    parser.add_argument("--budget-check", action="store_true", help="only measure the budget check's cost per request, in-process, and exit")
    parser.add_argument("--rest", type=float, default=2.0, help="seconds every target rests after its flat-out run, before the latency runs (default 2)")
    parser.add_argument("--pin", action="store_true", help="each target alone on CPU 0; wrk, the upstream and meter's ledger process on CPU 1")
    args = parser.parse_args()
    if args.budget_check:
        for case, us in budget_check_cost().items():
            print(f"budget check, {case}: {us:.3f} us")
        return None
    if args.role == "upstream":
        return run_upstream(args.port, args.deltas)
    if args.role == "bare":
        return run_bare(args.port, args.upstream, args.loop)
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (apt-get install wrk)")
    peers = [name for name in args.peers.split(",") if name]
    if peers:
        import peers as peer_kit  # scripts/peers.py, beside this file

        unknown = set(peers) - set(peer_kit.PEERS)
        if unknown:
            sys.exit(f"bench: unknown peer(s) {', '.join(sorted(unknown))}; known: {', '.join(peer_kit.PEERS)}")
        for name in peers:
            print(f"installing {name} (once; cached in {peer_kit.default_cache()})", flush=True)
            peer_kit.install(name, peer_kit.default_cache())

    global LOAD_CPUS
    if args.pin:
        if len(os.sched_getaffinity(0)) < 2:
            sys.exit("bench: --pin needs two CPUs")
        target_cpu, load_cpus = {0}, {1}
        LOAD_CPUS = load_cpus
        os.sched_setaffinity(0, load_cpus)  # this script and what it starts, unless moved
    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="meter-bench-"))
    ledger = work / "bench.duckdb"
    try:
        up_port = free_port()
        up = f"http://127.0.0.1:{up_port}"
        me = [sys.executable, __file__, "--deltas", str(args.deltas)]
        procs.append(subprocess.Popen([*me, "--role", "upstream", "--port", str(up_port)], stdout=subprocess.DEVNULL))
        wait_port(up_port)
        targets: dict[str, tuple[str, int, dict[str, str]]] = {"direct": (up, procs[0].pid, {})}
        for name, loop in (("bare", "uvloop"), ("bare-asyncio", "asyncio")):
            port = free_port()
            procs.append(subprocess.Popen([*me, "--role", "bare", "--loop", loop, "--port", str(port), "--upstream", up], stdout=subprocess.DEVNULL))
            targets[name] = (f"http://127.0.0.1:{port}", procs[-1].pid, {})
        meter_port = free_port()
        meter_admin = free_port()
        meter = start_meter_serve(up, meter_port, meter_admin, ledger)
        procs.append(meter)
        targets["meter"] = (f"http://127.0.0.1:{meter_port}", meter.pid, {})
        for name in peers:
            port = free_port()
            proc, headers = peer_kit.start(name, up, port, work)
            procs.append(proc)
            targets[name] = (f"http://127.0.0.1:{port}", proc.pid, headers)
        for url, _, _ in targets.values():
            wait_port(int(url.rsplit(":", 1)[1]), timeout=120)
        if args.pin:
            for name, (_, pid, _) in targets.items():
                if name != "direct":  # the upstream stays with the load
                    pin(pid, target_cpu)
            for child in process_tree(meter.pid)[1:]:
                pin(child, load_cpus)  # the ledger process: the proxy alone on its core

        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for kind in KINDS:
            stream = kind == "stream"
            for url, _, headers in targets.values():
                wrk(url, stream, 2, args.connections, work, headers)  # warm-up
            # Interleaved rounds: bare and meter see the same minute of this machine.
            for _ in range(args.rounds):
                for name, (url, pid, headers) in targets.items():
                    result = measure(url, pid, stream, args, work, headers, f"http://127.0.0.1:{meter_admin}" if name == "meter" else None)
                    runs.setdefault((kind, name), []).append(result)
                    print(f"  {kind:6} {name:12} {result['rps']:8.0f} req/s  CPU {result['cpu_us']:6.0f} us/req  p99 1 conn {result['p99_ms']:.2f} ms  "
                          f"paced {result['paced_p99_ms']:.2f} ms  errors {result['errors']:.0f}", flush=True)
        peaks = {name: tree_kb(pid, "VmHWM") for name, (_, pid, _) in targets.items()}

        # Memory: meter's tree RSS every 100,000 requests over --memory-requests more.
        # Each sample also process by process: the proxy, then its ledger process.
        rss_series: list[tuple[int, list[int]]] = [(0, tree_parts_kb(meter.pid, "VmRSS"))]
        deadline = time.monotonic() + max(600, args.memory_requests / 1000)
        sent = 0
        while sent < args.memory_requests and time.monotonic() < deadline:
            sent += int(wrk(targets["meter"][0], False, 10, args.connections, work)["requests"])
            if sent - rss_series[-1][0] >= 100_000 or sent >= args.memory_requests:
                rss_series.append((sent, tree_parts_kb(meter.pid, "VmRSS")))
        meter_peaks = tree_parts_kb(meter.pid, "VmHWM")

        print()
        print("| call | target | req/s | CPU us/req (tree) | p50 / p99 ms, 1 conn | p50 / p99 ms, 32 conn paced | p50 / p99 ms, 32 conn flat out | peak RSS MiB (tree) |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for (kind, name), rs in runs.items():
            r = {key: statistics.median(run[key] for run in rs) for key in MEASURES}
            cpu = f"{r['cpu_us']:.0f}" + (f" ({r['proxy_cpu_us']:.0f} proxy)" if name == "meter" else "")
            print(f"| {kind} | {name} | {r['rps']:.0f} | {cpu} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['paced_p50_ms']:.2f} / {r['paced_p99_ms']:.2f} | "
                  f"{r['sat_p50_ms']:.2f} / {r['sat_p99_ms']:.2f} | {peaks[name] / 1024:.0f} |")
        print()
        print(f"Per round, against the bare pass-through on the same loop (uvloop): median (min to max) over {args.rounds} rounds")
        for kind in KINDS:
            for base in ("bare", "bare-asyncio"):
                q = ratios({name: runs[(kind, name)] for name in targets}, "meter", base)
                pct, ms = (lambda v: f"{v:.1f}%"), (lambda v: f"{v:+.2f}")
                print(f"  {kind} vs {base}: req/s {spread(q['rps'], pct)}; by CPU/req {spread(q['cpu'], pct)}; "
                      f"p50 added at 1 conn {spread(q['p50'], ms)} ms; p99 added at 1 conn {spread(q['p99'], ms)} ms, "
                      f"at 32 paced {spread(q['paced_p99'], ms)} ms, at 32 flat out {spread(q['sat_p99'], ms)} ms")
            for name in peers:
                q = ratios({n: runs[(kind, n)] for n in targets}, "meter", name)
                print(f"  {kind} vs {name}: meter's req/s {spread(q['rps'], lambda v: f'{v / 100:.1f}x')}")
        print(f"meter's ledger caught up {spread(SETTLED, lambda v: f'{v:.2f}')} s after each flat-out run (then every target rests {args.rest:g} s before its latency runs)")
        print()
        grown = (sum(rss_series[-1][1]) - sum(rss_series[1][1])) / 1024 if len(rss_series) > 2 else 0.0
        print("meter's process tree RSS (MiB) by requests sent: " + ", ".join(f"{n:,}: {sum(parts) / 1024:.0f}" for n, parts in rss_series)
              + f"; {grown:+.1f} MiB after the first 100,000; peak {sum(meter_peaks) / 1024:.0f} MiB")
        print("  process by process (proxy / ledger process): " + ", ".join(f"{n:,}: {' / '.join(f'{kb / 1024:.0f}' for kb in parts)}" for n, parts in rss_series)
              + "; peaks " + " / ".join(f"{kb / 1024:.0f}" for kb in meter_peaks) + " MiB")
        stop_processes([meter])
        procs.remove(meter)
        rows, answered = ledger_rows(ledger), ANSWERED[targets["meter"][0]]
        # wrk cuts the requests in flight when a run ends: meter records those too
        # (client_disconnected), so the ledger may hold a few more rows than answers.
        verdict = "none lost" if rows >= answered else f"{answered - rows:,} LOST"
        print(f"ledger after SIGTERM: {rows:,} rows for {answered:,} requests wrk saw answered ({verdict})")
        print(f"ledger ingest: {ledger_ingest():,.0f} records/s")
        print("budget check, in-process: " + "; ".join(f"{case} {us:.2f} us" for case, us in budget_check_cost().items()))
    finally:
        stop_processes(procs)
        shutil.rmtree(work, ignore_errors=True)


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


if __name__ == "__main__":
    main()
