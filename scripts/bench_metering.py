#!/usr/bin/env python3
"""Metering's own CPU per request, in-process and itemised, with meter's real objects.

What the proxy does for one call besides forwarding, stage by stage, for a
non-streamed Responses call (bench.py's `response_json()`, one chunk) and a
streamed one (bench.py's `sse_events()`: created, 100 deltas, completed; one
event per chunk, as the upstream writes them):

1. flow: `Flow(...)`, `endpoint_for`, the request headers work
   (`forwardable_request_headers`, `take_meter_headers`), `Addons.request`;
2. admit: `Addons.admit` with no budget (`meter serve`'s default) and with one
   enforcing budget that matches the call but has not reached its limit;
3. observe: `observer_for`, `feed` per chunk, `finish` (and `release`);
4. record: `finished_record`;
5. done: each addon's `done` through the real registry (`Addons([addon])`, one
   line per addon, in `default_addons` order), down to the ledger writer's hand-off
   into its queue: a real `LedgerWriter` on a DuckDB file in a temporary directory,
   in its own process as `meter serve` runs it, started and stopped through the hooks.

Each stage runs over `--calls` calls at a time (stage after stage, so each call
sees the state the previous stage left, as in the proxy), timed with the main
thread's CPU clock: the ledger writer's thread, which runs meanwhile, is not
counted here.  The cyclic collector is paused while a stage is timed (its pauses
are latency, which bench.py measures).  Every figure is the median over
`--repeat` rounds after a warm-up round, with the min-max spread; response ids
are unique per call, as in real traffic, so usage is counted and priced.

Then the ledger writer's own work off the event loop: records handed to `done`
until its written count says the ledger has them (`flush()` wakes it); the
writer thread's CPU per record (the work under the proxy's GIL, found by the
thread's name), the proxy process's and the ledger process's CPU per record
(the latter in 10 ms ticks), and wall time per record.

    python scripts/bench_metering.py [--calls 5000] [--repeat 5]

Last, a request body's facts (model, stream, tags...; part of stage 4) by the
body's size: the benchmark's own body, and conversations of ~3 KB and ~47 KB
(a request is mostly its input), and a WebSocket `response.create` of the same
conversation, each read the usual way (msgspec, into just the members read)
and the general way (orjson's whole tree), interleaved.

Read it as: the "total" lines against the issue's targets (10 us per
non-streamed call, 0.2 us per SSE delta; a streamed call's total is its
per-response part plus 100 deltas); the largest lines are where to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import statistics
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# scripts/ is on sys.path
from bench import DELTAS, cpu_seconds, response_json, sse_events
from multidict import CIMultiDict, CIMultiDictProxy

from meter.attribution import take_meter_headers
from meter.budgets.gate import BudgetGate
from meter.budgets.spend import Budgets
from meter.budgets.sync import BudgetSync
from meter.config import Budget, Settings, load_settings
from meter.flow import Addons, Flow, finished_record
from meter.identity import KeyIdentities
from meter.ledger import LedgerWriter, store_for
from meter.metrics import LedgerMetrics, Metrics
from meter.observe import METERED_KIND, MeteringBudget, endpoint_for, observer_for, request_facts
from meter.observe.facts import request_facts_generally
from meter.observe.socket import read_create, read_create_generally
from meter.paths import normalised_path
from meter.prices import Pricer
from meter.proxy import forwardable_request_headers
from meter.server import default_addons

TARGET_CALL_US = 10.0  # issue #16: per non-streamed Responses call
TARGET_DELTA_US = 0.2  # issue #16: per SSE delta
PATH = "/v1/responses"
clock = time.thread_time_ns  # the main thread's CPU: the event loop's share


class Kit:
    """A meter's metering parts as `meter serve` builds them (no tracing, no access log:
    both off by default), with one enforcing budget on the side."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.identities = KeyIdentities(settings.keys)
        self.ledger = LedgerWriter(store_for(settings), flush_interval=settings.flush_interval, max_pending=settings.ledger_max_pending,
                                   spool_path=settings.spool_path())
        pricer = Pricer(provider_id=settings.price_provider, upstream_url=settings.upstream, overrides=settings.price_overrides)
        metrics = Metrics(settings)
        metrics.register(LedgerMetrics(self.ledger))
        budget = Budget(name="gpt-4o", match={"model": "gpt-4o"}, window="month", limit_usd=Decimal(1_000_000), mode="enforce")
        budgets = Budgets([budget], settings.keys)
        self.gate = BudgetGate(budgets, self.identities)
        sync = BudgetSync(budgets, self.ledger.store, settings.flush_interval)
        # serve's order with the budget's gate in place; the sync has no per-request hook
        # (it reads the ledger on a timer), so it is left out.
        self.addons = [a for a in default_addons(pricer, metrics, None, self.ledger, budgets=(self.gate, sync)) if a is not sync]
        self.default = Addons([a for a in self.addons if a is not self.gate])
        self.budgeted = Addons(self.addons)
        self.metering_budget = MeteringBudget(settings.max_metered_bytes_total)
        self.ids = itertools.count()  # response ids unique per call, as in real traffic


# The fake upstream's answer headers in bench.py, as aiohttp's client hands them over.
_SERVED = [("Date", "Mon, 30 Nov 2026 16:00:00 GMT"), ("Server", "Python/3.11 aiohttp/3.12")]
JSON_RESPONSE_HEADERS = CIMultiDictProxy(CIMultiDict([("Content-Type", "application/json; charset=utf-8"), ("openai-processing-ms", "5"),
                                                      ("x-request-id", "req_bench"), ("Content-Length", str(len(response_json()))), *_SERVED]))
SSE_RESPONSE_HEADERS = CIMultiDictProxy(CIMultiDict([("Content-Type", "text/event-stream"), *_SERVED, ("Transfer-Encoding", "chunked")]))


def one_round(kit: Kit, calls: int, stream: bool, hand_off: bool = True) -> tuple[dict[str, float], list[Any]]:
    """Every stage over `calls` calls; us per call by stage (per delta for `feed per
    delta`), and the finished records (handed to the ledger only with `hand_off`)."""
    body = f'{{"model": "gpt-4o", "input": "Say hello", "stream": {"true" if stream else "false"}}}'.encode()
    headers = CIMultiDictProxy(CIMultiDict([  # what wrk sends in bench.py
        ("Host", "127.0.0.1:8080"), ("Content-Length", str(len(body))), ("Content-Type", "application/json"), ("Authorization", "Bearer sk-bench-0123abcd"),
    ]))
    response_headers = SSE_RESPONSE_HEADERS if stream else JSON_RESPONSE_HEADERS
    events = sse_events()
    ids = [b"resp_%08d" % next(kit.ids) for _ in range(calls)]
    if stream:
        firsts = [events[0].replace(b"resp_bench", rid) for rid in ids]
        lasts = [events[-1].replace(b"resp_bench", rid) for rid in ids]
        deltas = events[1:-1]
    else:
        bodies = [response_json().replace(b"resp_bench", rid) for rid in ids]
    ns: dict[str, float] = {}
    gc.collect()
    gc.disable()
    try:
        request = kit.default.request
        t0 = clock()  # as Proxy.handle and Proxy._forward
        flows = [Flow(method="POST", path=(path := PATH.split("?", 1)[0]), endpoint=endpoint_for("POST", normalised_path(path)), headers=headers) for _ in range(calls)]
        ns["1 flow: Flow(...), endpoint_for"] = clock() - t0
        t0 = clock()
        for flow in flows:
            flow.upstream_headers = forwardable_request_headers(headers)
            flow.meter_headers = take_meter_headers(flow.upstream_headers)
        ns["1 flow: forwardable headers, meter headers"] = clock() - t0
        t0 = clock()
        for flow in flows:
            request(flow)
            flow.request_body = body
            flow.request_bytes = len(body)
        ns["1 flow: Addons.request"] = clock() - t0
        for name, registry in (("2 admit, no budget (default)", kit.default), ("2 admit, one enforcing budget", kit.budgeted)):
            admit = registry.admit
            t0 = clock()
            for flow in flows:
                admit(flow)
            ns[name] = clock() - t0

        max_bytes, budget = kit.settings.max_metered_bytes, kit.metering_budget
        t0 = clock()
        observers = []
        for flow in flows:
            flow.ttfb_at = time.perf_counter()
            flow.status_code = 200
            flow.response_headers = response_headers
            kind = METERED_KIND.get(flow.endpoint)
            observers.append(observer_for(kind, response_headers.get("Content-Type", ""), response_headers.get("Content-Encoding", ""), max_bytes=max_bytes, budget=budget))  # type: ignore[arg-type]
        ns["3 observe: observer_for"] = clock() - t0
        if stream:
            t0 = clock()
            for observer, first in zip(observers, firsts):
                observer.feed(first)
            fixed = clock() - t0
            t0 = clock()
            for observer in observers:
                feed = observer.feed
                for delta in deltas:
                    feed(delta)
            ns["3 observe: feed per delta"] = (clock() - t0) / len(deltas)
            t0 = clock()
            for observer, last in zip(observers, lasts):
                observer.feed(last)
            ns["3 observe: feed (created + completed)"] = fixed + clock() - t0
        else:
            t0 = clock()
            for observer, one in zip(observers, bodies):
                observer.feed(one)
            ns["3 observe: feed (one chunk)"] = clock() - t0
        t0 = clock()
        for flow, observer in zip(flows, observers):
            flow.observation = observer.finish()
            observer.release()
            flow.finished_at = time.perf_counter()
        ns["3 observe: finish"] = clock() - t0

        identities = kit.identities
        t0 = clock()
        records = [finished_record(flow, identities) for flow in flows]
        ns["4 record: finished_record"] = clock() - t0

        for addon in kit.addons:
            if addon is kit.ledger and not hand_off:
                continue
            done = Addons([addon]).done
            t0 = clock()
            for flow, record in zip(flows, records):
                done(flow, record)
            ns[f"5 done: {type(addon).__name__}"] = clock() - t0
    finally:
        gc.enable()
    return {name: v / calls / 1000 for name, v in ns.items()}, records


async def stages(kit: Kit, calls: int, repeat: int, stream: bool) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {}
    loop = asyncio.get_running_loop()
    for i in range(repeat + 1):  # the first round warms up caches, metric series, maps
        # The writer writes between rounds, not during the stages it would disturb; the
        # loop stays free meanwhile, as the writer takes its batches on it.
        await loop.run_in_executor(None, kit.ledger.flush, 60)
        per_call = one_round(kit, calls, stream)[0]
        for name, us in per_call.items() if i else ():
            runs.setdefault(name, []).append(us)
    return runs


def totals(kit: Kit, runs: dict[str, list[float]], budgeted: bool) -> list[float]:
    """Per round: every per-call stage of the chosen configuration."""
    gate = f"5 done: {type(kit.gate).__name__}"

    def counted(name: str) -> bool:
        if name.endswith("per delta"):
            return False
        if name.startswith("2 admit"):
            return ("enforcing" in name) == budgeted
        return budgeted or name != gate

    return [sum(us[i] for name, us in runs.items() if counted(name)) for i in range(len(next(iter(runs.values()))))]


async def writer_path(kit: Kit, records: list[Any]) -> dict[str, float]:
    """Records through the ledger writer's `done` until they are written:
    us per record of the proxy process's CPU (the event loop, which takes the
    batches, and the writer's thread, which sends them), the writer thread's
    alone, the ledger process's CPU, and wall time."""
    ledger = kit.ledger
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ledger.flush, 60)
    # The writer's thread by its name (stable across rewrites of its internals); its own CPU clock.
    thread = next((t for t in threading.enumerate() if t.name == "meter-ledger"), None)
    clock_id = time.pthread_getcpuclockid(thread.ident) if thread is not None and thread.ident is not None else None

    def thread_clock() -> float:
        return time.clock_gettime(clock_id) if clock_id is not None else float("nan")

    children = []  # the ledger process
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a kernel without CONFIG_PROC_CHILDREN: not measured
            children += [int(pid) for pid in (task / "children").read_text().split()]
    written0, th0, pr0, ch0, w0 = ledger.stats.written, thread_clock(), time.process_time(), sum(map(cpu_seconds, children)), time.perf_counter()
    done = Addons([ledger]).done
    for record in records:
        done(None, record)  # type: ignore[arg-type]
    n, deadline = len(records), time.monotonic() + 120
    # `flush()` may return while the writer holds a batch it has taken but not yet
    # counted as pending: the written count is what says the ledger has them.
    while ledger.stats.written - written0 < n and time.monotonic() < deadline:
        await loop.run_in_executor(None, ledger.flush, 120)
        await asyncio.sleep(0.001)
    wall = time.perf_counter() - w0
    if ledger.stats.written - written0 != n:
        raise SystemExit(f"ledger: {ledger.stats.written - written0} of {n} records written")
    return {
        "proxy process CPU (loop and writer thread)": (time.process_time() - pr0) / n * 1e6,
        "of which the writer thread": (thread_clock() - th0) / n * 1e6,
        "ledger process CPU": (sum(map(cpu_seconds, children)) - ch0) / n * 1e6,
        "wall, done to written": wall / n * 1e6,
    }


def cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


async def measure(args: argparse.Namespace, ledger_path: Path) -> None:
    settings = load_settings({"upstream": "http://127.0.0.1:9", "ledger": str(ledger_path)}, env={})
    kit = Kit(settings)
    registry = Addons(kit.addons)
    await registry.start()  # the ledger writer opens its store (the ledger process) and starts its thread, as in serve
    try:
        gc.freeze()  # as `meter serve` does once started
        json_runs = await stages(kit, args.calls, args.repeat, stream=False)
        sse_runs = await stages(kit, args.calls, args.repeat, stream=True)
        records = one_round(kit, max(args.calls * 4, 20_000), stream=False, hand_off=False)[1]
        writer = await writer_path(kit, records)
    finally:
        await registry.stop()  # flushes and closes the ledger process
    print(f"Metering CPU per call, in-process (main thread CPU, us): median of {args.repeat} rounds of {args.calls} calls (min-max).\n"
          f"Streamed: {DELTAS} deltas, one SSE event per chunk; its column is per response unless the stage says per delta.\n")
    print(f"| {'stage':44} | {'JSON us/call':26} | {'SSE us/response':26} |")
    print(f"| {'-' * 44} | {'-' * 26} | {'-' * 26} |")
    # In stage order; within observing, `finish` last.
    for name in sorted(dict.fromkeys([*json_runs, *sse_runs]), key=lambda n: (n[0], "finish" in n)):
        print(f"| {name:44} | {cell(json_runs.get(name)):26} | {cell(sse_runs.get(name)):26} |")
    for label, budgeted in (("total, default settings (no budget)", False), ("total, one enforcing budget", True)):
        print(f"| {label:44} | {cell(totals(kit, json_runs, budgeted)):26} | {cell(totals(kit, sse_runs, budgeted)):26} |")
    print("\nLedger writer, per record (done -> written: taken and encoded on the event loop, sent by the writer's thread):")
    print("  " + "; ".join(f"{name} {us:.2f} us" for name, us in writer.items()) + "\n")
    call = statistics.median(totals(kit, json_runs, False))
    delta = statistics.median(sse_runs["3 observe: feed per delta"])
    streamed = statistics.median(totals(kit, sse_runs, False))
    print(f"streamed call, default settings: {streamed:.2f} us per response + {DELTAS} x {delta:.3f} us per delta = {streamed + DELTAS * delta:.2f} us")
    print(f"target non-streamed call <= {TARGET_CALL_US:g} us: {call:.2f} us {'PASS' if call <= TARGET_CALL_US else 'MISS'}")
    print(f"target per SSE delta <= {TARGET_DELTA_US:g} us: {delta:.3f} us {'PASS' if delta <= TARGET_DELTA_US else 'MISS'}")
    print("\nA request body's facts by its size, us per body (usual reading: msgspec; general: orjson):")
    for label, size, usual, general in facts_by_size(args.repeat):
        print(f"  {label} ({size:,} bytes): {cell(usual)} against {cell(general)}")


def conversation_body(turns: int) -> bytes:
    """A Responses request carrying a conversation of `turns` messages."""
    import json

    message = {"role": "user", "content": [{"type": "input_text", "text": "Lorem ipsum dolor sit amet, consectetur. " * 6}]}
    return json.dumps({"model": "gpt-4o", "input": [message] * turns, "stream": True, "metadata": {"team": "search"}}).encode()


def facts_by_size(repeat: int) -> list[tuple[str, int, list[float], list[float]]]:
    """us per body for `request_facts` (the usual reading) and the general reading, by size."""
    bodies = [("the benchmark's body", b'{"model": "gpt-4o", "input": "Say hello", "stream": false}'),
              ("10 turns", conversation_body(10)), ("150 turns", conversation_body(150))]
    readers = (request_facts, request_facts_generally)
    cases: list[tuple[str, bytes, tuple[Any, Any]]] = [(label, body, readers) for label, body in bodies]
    # A WebSocket turn (`response.create`): read before the message is relayed.
    cases.append(("a WebSocket response.create, 150 turns", b'{"type": "response.create", ' + conversation_body(150)[1:], (read_create, read_create_generally)))
    rows = []
    for label, body, (read_usual, read_general) in cases:
        n = max(200, 2_000_000 // (len(body) + 500))
        usual: list[float] = []
        general: list[float] = []
        for _ in range(repeat):
            for read, runs in ((read_usual, usual), (read_general, general)):
                t0 = clock()
                for _ in range(n):
                    read(body)
                runs.append((clock() - t0) / n / 1000)
        rows.append((label, len(body), usual, general))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per round and stage (default 5000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds after one warm-up; medians are reported (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meter-bench-metering-") as work:
        asyncio.run(measure(args, Path(work) / "bench.duckdb"))


if __name__ == "__main__":
    main()
