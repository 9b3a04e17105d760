#!/usr/bin/env python3
"""Benchmark of WebSocket mode: meter against a bare relay and a direct connection, in one run.

Starts, on loopback, a fast WebSocket upstream (each `response.create` is
answered with `response.created`, N output text deltas and `response.completed`
with usage) and four ways to it besides the direct connection:

- `bare`: a bare aiohttp relay, a message at a time, at its fastest (bytes as
  received, `send_frame`);
- `relay`: meter's own `WebSocketRelay` on a path it does not meter (no parsing,
  no records): the relay alone;
- `metered`: the same relay metering every response, with no sinks;
- `meter`: `meter serve` with its DuckDB ledger, metrics and (unconfigured) traces.

Then, for each target:

- throughput: C sockets each asking for responses of N deltas back to back;
  messages relayed to the clients per second;
- latency: one socket, responses with no delta (created + completed), one at a
  time; round trip from `response.create` to `response.completed`, p50/p99.

with the relay process's CPU time per relayed message (robust on a busy
machine, where messages/s mostly measures the client), and prints what
metering adds per message and per round trip over the bare relay and over the
direct connection.  Besides medians it prints meter against bare within each
round (seconds apart, so the machine's drift cancels out) with their range, and
metering's own CPU measured in-process on the same events.

    python scripts/bench_ws.py [--duration 3] [--rounds 3] [--sockets 16] [--deltas 200]

Everything stays on 127.0.0.1 and every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# scripts/ is on sys.path
from bench import cpu_seconds, free_port, run_event_loop, serve_forever, start_meter_serve, stop_processes, wait_port

BARE_PATH = "/bare"  # the bare relay forwards /bare/v1/responses to /v1/responses without metering


# --- the messages ----------------------------------------------------------------
# What the client asks and the upstream answers, as the API writes them (compact JSON,
# `type` first); the upstream and the in-process metering measure use the same ones.

USAGE = {"input_tokens": 25, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 34}


def create_message(deltas: int) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-4o", "input": "hi", "metadata": {"deltas": str(deltas)}})


def _event(kind: str, seq: int, **fields: Any) -> str:
    return json.dumps({"type": kind, "sequence_number": seq, **fields}, separators=(",", ":"))


def _head(rid: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "status": "in_progress", "model": "gpt-4o-2024-08-06", "service_tier": "auto", "usage": None}


def created_event(rid: str) -> str:
    return _event("response.created", 0, response=_head(rid))


def delta_event(seq: int) -> str:
    return _event("response.output_text.delta", seq, item_id="msg_1", output_index=0, content_index=0, delta="tok ", logprobs=[])


def completed_event(rid: str, seq: int) -> str:
    return _event("response.completed", seq, response={**_head(rid), "status": "completed", "service_tier": "default", "usage": USAGE})


# --- child processes -------------------------------------------------------------


def run_upstream(port: int) -> None:
    import aiohttp
    from aiohttp import web

    counter = 0

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal counter
        ws = web.WebSocketResponse(max_msg_size=0, compress=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            if event.get("type") != "response.create":
                continue
            counter += 1
            deltas = int((event.get("metadata") or {}).get("deltas", "0"))
            rid = f"resp_{counter}"
            await ws.send_str(created_event(rid))
            for i in range(deltas):
                await ws.send_str(delta_event(i + 1))
            await ws.send_str(completed_event(rid, deltas + 1))
        return ws

    run_event_loop(serve_forever(handle, port, handler_cancellation=False))


def run_bare(port: int, upstream: str) -> None:
    """The bare relay: aiohttp's public API at its fastest, a message at a time.

    Bytes are relayed as they were received (no UTF-8 decoding and re-encoding),
    with `send_frame`; pings are answered per hop, and a close on either side
    closes the other."""
    import aiohttp
    from aiohttp import web

    async def main() -> None:
        session = aiohttp.ClientSession(auto_decompress=False)
        ws_upstream = upstream.replace("http://", "ws://", 1)

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                    await dst.send_frame(msg.data, msg.type)
            await dst.close()

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path.removeprefix(BARE_PATH)
            async with session.ws_connect(ws_upstream + path, max_msg_size=0, decode_text=False, headers={"Authorization": request.headers.get("Authorization", "")}) as up:
                ws = web.WebSocketResponse(max_msg_size=0, decode_text=False)
                await ws.prepare(request)
                await asyncio.gather(pump(ws, up), pump(up, ws))
                return ws

        await serve_forever(handle, port)

    run_event_loop(main())


def run_relay(port: int, upstream: str, metered: bool = False) -> None:
    """meter's relay with metering off: the same code path on an unmetered endpoint.

    With `metered`, the relay meters every response (records built) but hands the
    records to no sink: the cost of WebSocket metering alone, without ledger,
    metrics or traces."""
    from aiohttp import web

    from meter.config import load_settings
    from meter.flow import Addons, Flow
    from meter.identity import KeyIdentities
    from meter.server import make_session
    from meter.websocket import WebSocketRelay

    async def main() -> None:
        settings = load_settings({"upstream": upstream}, env={})
        relay = WebSocketRelay(upstream, make_session(settings), Addons([]), KeyIdentities())

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path.removeprefix(BARE_PATH)
            clone = request.clone(rel_url=path)
            endpoint = "responses" if metered else "other"
            return await relay.handle(clone, Flow(method="GET", path=path, endpoint=endpoint, headers=request.headers, transport="websocket"))

        await serve_forever(handle, port)

    run_event_loop(main())


# --- the client ------------------------------------------------------------------


async def throughput(url: str, sockets: int, deltas: int, duration: float) -> tuple[int, float]:
    import aiohttp

    create = create_message(deltas)
    received = 0
    stop_at = time.perf_counter() + duration

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received
        async with session.ws_connect(url, max_msg_size=0, headers={"Authorization": "Bearer sk-bench-ws"}) as ws:
            while time.perf_counter() < stop_at:
                await ws.send_str(create)
                while True:
                    msg = await ws.receive()
                    received += 1
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"unexpected {msg.type}")
                    if msg.data.startswith('{"type":"response.completed"'):
                        break

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(asyncio.gather(*(one(session) for _ in range(sockets))), duration + 30)
    return received, time.perf_counter() - t0


async def latency(url: str, duration: float) -> tuple[float, float]:
    import aiohttp

    create = create_message(0)
    samples: list[float] = []
    stop_at = time.perf_counter() + duration
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0, headers={"Authorization": "Bearer sk-bench-ws"}) as ws:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await ws.send_str(create)
            while True:
                msg = await asyncio.wait_for(ws.receive(), 10)
                if msg.data.startswith('{"type":"response.completed"'):
                    break
            samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


# --- metering alone, in-process ----------------------------------------------------


def metering_cost(deltas: int, responses: int = 5000) -> tuple[float, float]:
    """CPU of metering alone, free of the machine's drift: the same events the upstream
    sends, fed to one socket's metering with no sinks.  (us per delta, us per response
    besides its deltas)."""
    from meter.flow import Addons, Flow
    from meter.identity import KeyIdentities
    from meter.observe.socket import SocketMeter
    from meter.websocket import WebSocketRelay

    create = create_message(deltas).encode()
    created, delta, completed = created_event("resp_{}").encode(), delta_event(1).encode(), completed_event("resp_{}", 2).encode()
    relay = WebSocketRelay("http://upstream.invalid", None, Addons([]), KeyIdentities())  # type: ignore[arg-type]
    meter = SocketMeter(relay, Flow(method="GET", path="/v1/responses", endpoint="responses", headers={}, transport="websocket"), None, None)

    def run(n_deltas: int) -> float:
        t0 = time.process_time()
        for i in range(responses):
            rid = b"resp_%d" % i
            meter.on_client(create)
            meter.on_upstream(created.replace(b"resp_{}", rid))
            for _ in range(n_deltas):
                meter.on_upstream(delta)
            meter.on_upstream(completed.replace(b"resp_{}", rid))
        return (time.process_time() - t0) / responses * 1e6

    run(1)  # warm-up
    few, many = run(1), run(deltas + 1)
    return (many - few) / deltas, few - (many - few) / deltas


# --- the orchestrator --------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["upstream", "bare", "relay", "metered"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of throughput per target and round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the targets (default 3)")
    parser.add_argument("--sockets", type=int, default=16, help="concurrent sockets for throughput (default 16)")
    parser.add_argument("--deltas", type=int, default=200, help="output deltas per response for throughput (default 200)")
    args = parser.parse_args()
    if args.role == "upstream":
        return run_upstream(args.port)
    if args.role == "bare":
        return run_bare(args.port, args.upstream)
    if args.role in ("relay", "metered"):
        return run_relay(args.port, args.upstream, metered=args.role == "metered")

    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="meter-bench-ws-"))
    try:
        up_port, meter_port, admin_port = free_port(), free_port(), free_port()
        up = f"http://127.0.0.1:{up_port}"
        procs.append(subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(up_port)], stdout=subprocess.DEVNULL))
        wait_port(up_port)
        pids: dict[str, int] = {}
        targets = {"direct": f"ws://127.0.0.1:{up_port}/v1/responses"}
        for role in ("bare", "relay", "metered"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--role", role, "--port", str(port), "--upstream", up], stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(port)
            pids[role] = proc.pid
            targets[role] = f"ws://127.0.0.1:{port}{BARE_PATH}/v1/responses"
        meter = start_meter_serve(up, meter_port, admin_port, work / "bench.duckdb")
        procs.append(meter)
        wait_port(meter_port)
        pids["meter"] = meter.pid
        targets["meter"] = f"ws://127.0.0.1:{meter_port}/v1/responses"
        for url in targets.values():
            asyncio.run(throughput(url, args.sockets, args.deltas, 1.0))  # warm-up
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for round_ in range(args.rounds):  # interleaved, so that drift in machine load hits every target alike
            for name, url in targets.items():
                pid = pids.get(name)
                cpu0 = cpu_seconds(pid) if pid else 0.0
                messages, elapsed = asyncio.run(throughput(url, args.sockets, args.deltas, args.duration))
                cpu = (cpu_seconds(pid) - cpu0) if pid else float("nan")
                p50, p99 = asyncio.run(latency(url, args.duration / 2))
                r = {"mps": messages / elapsed, "cpu_us": 1e6 * cpu / messages, "p50": p50, "p99": p99}
                runs[name].append(r)
                print(f"  round {round_ + 1} {name:7} {r['mps']:10,.0f} msg/s  relay CPU {r['cpu_us']:6.2f} us/msg  round trip p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
        results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}

        print()
        print(f"Medians of {args.rounds} rounds; {args.sockets} sockets, {args.deltas} deltas per response; relay CPU = the relay process's user+system time per message it relayed to the clients.")
        print()
        print("| target | messages/s | relay CPU us/msg | round trip p50 ms | round trip p99 ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, r in results.items():
            cpu_cell = "-" if name == "direct" else f"{r['cpu_us']:.2f}"
            print(f"| {name} | {r['mps']:,.0f} | {cpu_cell} | {r['p50']:.3f} | {r['p99']:.3f} |")
        print()
        bare, relay, metered, met, direct = (results[k] for k in ("bare", "relay", "metered", "meter", "direct"))
        print(f"messages/s: meter at {100 * met['mps'] / bare['mps']:.1f}% of the bare relay (meter's relay alone {100 * relay['mps'] / bare['mps']:.1f}%, with metering but no sinks {100 * metered['mps'] / bare['mps']:.1f}%)")
        print(f"relay CPU per message: meter {met['cpu_us']:.2f} us against bare {bare['cpu_us']:.2f} us ({100 * bare['cpu_us'] / met['cpu_us']:.1f}%)")
        # The machine's speed drifts between minutes: a round's meter and bare runs are
        # seconds apart, so the ratio within each round is the steadier figure.
        paired = sorted(100 * m["mps"] / b["mps"] for m, b in zip(runs["meter"], runs["bare"]))
        paired_cpu = sorted(100 * b["cpu_us"] / m["cpu_us"] for m, b in zip(runs["meter"], runs["bare"]))
        print(f"per round, meter against bare: messages/s median {statistics.median(paired):.1f}% (range {paired[0]:.0f}-{paired[-1]:.0f}%), by CPU per message median {statistics.median(paired_cpu):.1f}% (range {paired_cpu[0]:.0f}-{paired_cpu[-1]:.0f}%)")
        print(f"  over meter's own relay: metering {metered['cpu_us'] - relay['cpu_us']:+.2f} us, meter serve (ledger, metrics) {met['cpu_us'] - relay['cpu_us']:+.2f} us")
        per_delta, per_response = metering_cost(args.deltas)
        print(f"metering alone, in-process: {per_delta:.2f} us per delta, {per_response:.1f} us per response besides its deltas ({per_delta + per_response / (args.deltas + 3):.2f} us per message at {args.deltas} deltas)")
        # A round trip is 3 messages (response.create up; created and completed down).
        print(f"added round-trip latency (p50): {met['p50'] - bare['p50']:+.3f} ms over bare, {met['p50'] - direct['p50']:+.3f} ms over direct")
    finally:
        stop_processes(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
