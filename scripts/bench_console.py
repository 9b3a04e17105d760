#!/usr/bin/env python3
"""Benchmark: the console's views over a ledger of a million rows, on DuckDB and PostgreSQL.

For each store (a DuckDB file; a database on a throwaway PostgreSQL server
started as tests/pg.py does), builds a ledger of `--rows` rows in one
INSERT ... SELECT (8 keys, 4 models, 3 `team` tags, a cost on every row, one
error in 97; one row every 37 seconds back from now: 428 days), starts a real
`meter serve` on it, and times what the console asks for when a view is shown:
its four admin API requests at once, as the page sends them (spend per day by
key, the table by key and model, the budgets, the latest 50 requests), through
HTTP, each view `--runs` times.  Prints the median and the slowest wall time
per view; the console's target is under a second (SPEC §12).

    python scripts/bench_console.py [--rows 1000000] [--stores duckdb postgresql] [--runs 5]

Needs the PostgreSQL server binaries for the postgresql store (see tests/pg.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.many_rows import duckdb_ledger, postgres_ledger

if TYPE_CHECKING:
    from tests.pg import PostgresServer

_COLUMNS = (
    "id, started_at, finished_at, method, path, endpoint, outcome, status_code, model, service_tier, key_id, key_hint,"
    " input_tokens, cached_tokens, output_tokens, reasoning_tokens, total_tokens, cost_usd, tags, duration_ms"
)
# {uuid}, {start}, {hex_key} and {tags} differ per dialect; the rest is the same SQL.
_VALUES = """{uuid}, {start}, {start},
       'POST', '/v1/responses', 'responses',
       CASE WHEN i % 97 = 0 THEN 'error' ELSE 'completed' END, CASE WHEN i % 97 = 0 THEN 500 ELSE 200 END,
       'bench-model-' || CAST(i % 4 AS VARCHAR), 'default', {hex_key}, 'sk-...' || CAST(1000 + i % 8 AS VARCHAR),
       100 + i % 1000, i % 50, 10 + i % 100, i % 10, 110 + i % 1000 + i % 100,
       CAST((i % 1000) * 0.000001 AS DECIMAL(18,9)), {tags}, 100 + i % 900"""

DUCKDB_ROWS = f"""INSERT INTO requests ({_COLUMNS})
SELECT {_VALUES.format(
    uuid="uuid()",
    start="current_timestamp - to_seconds(i * 37)",
    hex_key="printf('%016x', 4096 + i % 8)",
    tags="json_object('team', 'team-' || CAST(i % 3 AS VARCHAR))",
)}
FROM range($1) AS t(i)"""

POSTGRES_ROWS = f"""INSERT INTO requests ({_COLUMNS})
SELECT {_VALUES.format(
    uuid="gen_random_uuid()",
    start="now() - i * interval '37 seconds'",
    hex_key="lpad(to_hex(4096 + i % 8), 16, '0')",
    tags="jsonb_build_object('team', 'team-' || CAST(i % 3 AS VARCHAR))",
)}
FROM generate_series(0, $1 - 1) AS t(i)"""

# What the console shows, as its filters ask for it (the page's query string).
VIEWS = {
    "all time, no filter": "",
    "all time, model=bench-model-1": "where=model%3Dbench-model-1",
    "all time, key + tag:team": "where=key%3D0000000000001003&where=tag%3Ateam%3Dteam-1",
    "last 30 days, model": "since=30d&where=model%3Dbench-model-2",
    "last 24 hours, no filter": "since=24h",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_meter(ledger: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port, admin = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meter", "serve", "--upstream", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{admin}", "--ledger", ledger],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"meter serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", admin), timeout=0.2):
                return proc, f"http://127.0.0.1:{admin}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("meter serve did not start")


async def one_view(session: aiohttp.ClientSession, admin: str, query: str) -> float:
    """Wall seconds for the page's four requests at once (as the browser sends them)."""
    q = query + "&" if query else ""
    bucket = "hour" if "since=24h" in query else "day"
    paths = [f"/api/report?{q}by={bucket}&by=key", f"/api/report?{q}by=key&by=model", "/api/budgets", f"/api/requests?{q}limit=50"]

    async def get(path: str) -> None:
        async with session.get(admin + path) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{path}: {r.status} {body[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(get(p) for p in paths))
    return time.perf_counter() - started


async def measure(admin: str, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    async with aiohttp.ClientSession() as session:
        await one_view(session, admin, "")  # the first read warms the store's caches
        for name, query in VIEWS.items():
            out[name] = [await one_view(session, admin, query) for _ in range(runs)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stores", nargs="+", choices=["duckdb", "postgresql"], default=["duckdb", "postgresql"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    results: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="meter-bench-console-") as tmp:
        directory = Path(tmp)
        server: PostgresServer | None = None
        try:
            for store in args.stores:
                t0 = time.monotonic()
                if store == "postgresql":
                    from tests.pg import PostgresServer

                    server = PostgresServer().start()
                    ledger = postgres_ledger(server.new_database("console"), POSTGRES_ROWS, args.rows, then=["VACUUM ANALYZE requests"])
                else:
                    ledger = duckdb_ledger(directory / f"console-{args.rows}.duckdb", DUCKDB_ROWS, args.rows)
                print(f"{store}: {args.rows:,} rows built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                proc, admin = start_meter(ledger, directory / f"meter-{store}.log")
                try:
                    for view, times in asyncio.run(measure(admin, args.runs)).items():
                        results.append((store, view, statistics.median(times), max(times)))
                finally:
                    proc.terminate()
                    proc.wait(30)
        finally:
            if server is not None:
                server.cleanup()

    print(f"{'store':<11} {'view':<32} {'median s':>9} {'slowest s':>10}")
    for store, view, median, slowest in results:
        print(f"{store:<11} {view:<32} {median:>9.3f} {slowest:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
