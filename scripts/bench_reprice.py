#!/usr/bin/env python3
"""Benchmark: `meter reprice` on a large ledger, on DuckDB and on PostgreSQL, in bounded memory.

For each size (default 200,000 and 1,000,000 rows) and each store (a DuckDB
file; a database on a throwaway PostgreSQL server started as tests/pg.py does,
initdb/pg_ctl in a temporary directory), builds a ledger of rows with usage
and no cost (one INSERT ... SELECT over range/generate_series), then runs
`meter reprice` as a child process with a price override for the rows' model,
so that every row changes: first `--dry-run`, then for real.  Prints the wall
time and the peak RSS of each reprice process (its own VmHWM).
Memory is bounded when the peak RSS does not grow with the rows.

    python scripts/bench_reprice.py [--rows 200000 1000000] [--stores duckdb postgresql]

Needs the PostgreSQL server binaries for the postgresql store (see tests/pg.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.many_rows import duckdb_ledger, duckdb_rows, postgres_ledger, postgres_rows, run_with_peak

if TYPE_CHECKING:
    from tests.pg import PostgresServer

# Every row is `bench-model` on the standard tier with usage and no cost: this
# override prices each one, so a reprice changes every row.
CONFIG = """
[prices."bench-model"]
input_mtok = 2
cached_mtok = 0.5
output_mtok = 8
"""

DUCKDB_ROWS = duckdb_rows("bench-model")
POSTGRES_ROWS = postgres_rows("bench-model")


def run_reprice(ledger: str, config: Path, *, dry_run: bool) -> tuple[str, float, int]:
    """(stdout, wall seconds, peak RSS in KiB) of one `meter reprice` process."""
    args = ["reprice", "--ledger", ledger, "--config", str(config), *(["--dry-run"] if dry_run else [])]
    started = time.monotonic()
    result, peak = run_with_peak(args, timeout=3600)
    elapsed = time.monotonic() - started
    if peak is None:
        raise RuntimeError(f"meter reprice failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip(), elapsed, peak // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--stores", nargs="+", choices=["duckdb", "postgresql"], default=["duckdb", "postgresql"])
    args = parser.parse_args()

    results: list[tuple[str, int, str, float, int, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="meter-bench-reprice-") as tmp:
        directory = Path(tmp)
        config = directory / "meter.toml"
        config.write_text(CONFIG)
        server: PostgresServer | None = None
        try:
            for store in args.stores:
                if store == "postgresql":
                    from tests.pg import PostgresServer

                    server = PostgresServer().start()
                for rows in args.rows:
                    t0 = time.monotonic()
                    ledger = (
                        postgres_ledger(server.new_database("bench"), POSTGRES_ROWS, rows, then=["ANALYZE requests"])
                        if server is not None and store == "postgresql"
                        else duckdb_ledger(directory / f"bench-{rows}.duckdb", DUCKDB_ROWS, rows)
                    )
                    print(f"{store}: {rows:,} rows built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                    dry, dry_s, dry_rss = run_reprice(ledger, config, dry_run=True)
                    real, real_s, real_rss = run_reprice(ledger, config, dry_run=False)
                    expected = f"repriced {rows} of {rows} rows"
                    if not real.startswith(expected) or not dry.startswith(f"would reprice {rows} of {rows} rows"):
                        raise RuntimeError(f"{store}, {rows} rows: unexpected output {dry!r} / {real!r}")
                    results.append((store, rows, real, real_s, real_rss, dry_s, dry_rss))
                    if store == "duckdb":
                        os.unlink(ledger)
        finally:
            if server is not None:
                server.cleanup()

    print(f"{'store':<11} {'rows':>9}  {'reprice s':>9}  {'peak RSS':>9}  {'dry-run s':>9}  {'dry-run RSS':>11}")
    for store, rows, _out, real_s, real_rss, dry_s, dry_rss in results:
        print(f"{store:<11} {rows:>9,}  {real_s:>9.1f}  {real_rss / 1024:>6.0f} MiB  {dry_s:>9.1f}  {dry_rss / 1024:>8.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
