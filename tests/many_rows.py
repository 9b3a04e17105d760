"""Ledgers of many rows, made in one statement, and the peak memory of a `meter`
command over them (reprice's and prune's bounded-memory tests, scripts/bench_reprice.py,
scripts/bench_console.py).

`duckdb_rows`/`postgres_rows`: rows with usage and no cost, one every 37 seconds from
2026-01-01, total = input + output, so no usage invariant leaves a row unpriced and a
price override for `model` changes every one of them.  `duckdb_ledger` and
`postgres_ledger` make a migrated ledger and run such an INSERT (any INSERT taking the
row count as $1) in it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COLUMNS = (
    "id, started_at, finished_at, method, path, endpoint, outcome, model, service_tier,"
    " input_tokens, cached_tokens, output_tokens, reasoning_tokens, total_tokens, cost_usd"
)
_VALUES = """'POST', '/v1/responses', 'responses', 'completed', {model}, 'default',
       100 + i % 1000, i % 50, 10 + i % 100, i % 10, 110 + i % 1000 + i % 100, NULL"""


def duckdb_rows(model: str) -> str:
    """INSERT of $1 rows into a DuckDB ledger."""
    return f"""
INSERT INTO requests ({_COLUMNS})
SELECT uuid(), TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i * 37), TIMESTAMPTZ '2026-01-01 00:00:01+00' + to_seconds(i * 37),
       {_VALUES.format(model=_literal(model))}
FROM range($1) AS t(i)
"""


def postgres_rows(model: str) -> str:
    """INSERT of $1 rows into a PostgreSQL ledger."""
    return f"""
INSERT INTO requests ({_COLUMNS})
SELECT gen_random_uuid(), TIMESTAMPTZ '2026-01-01 00:00:00+00' + i * interval '37 seconds', TIMESTAMPTZ '2026-01-01 00:00:01+00' + i * interval '37 seconds',
       {_VALUES.format(model=_literal(model))}
FROM generate_series(0, $1 - 1) AS t(i)
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def duckdb_ledger(path: Path | str, insert: str, rows: int) -> str:
    """A DuckDB ledger file with the current schema and `rows` rows made by `insert`."""
    import duckdb

    from meter.ledger import DuckDBStore

    store = DuckDBStore(str(path))
    store.open()  # creates the file and applies every migration
    store.close()
    con = duckdb.connect(str(path))
    try:
        con.execute(insert, [rows])
    finally:
        con.close()
    return str(path)


def postgres_ledger(url: str, insert: str, rows: int, *, then: Sequence[str] = ()) -> str:
    """The database at `url` migrated and given `rows` rows made by `insert`, then the
    statements `then` (an ANALYZE, say); its URL."""
    import asyncpg

    from meter.ledger import PostgresStore

    store = PostgresStore(url)
    store.open()  # applies every migration
    store.close()

    async def fill() -> None:
        con = await asyncpg.connect(url)
        try:
            await con.execute(insert, rows)
            for statement in then:
                await con.execute(statement)
        finally:
            await con.close()

    asyncio.run(fill())
    return url


# A `meter` command in a process that writes its own peak RSS (the kernel's VmHWM) last
# on stderr.  wait4's ru_maxrss would not do: exec records the forking parent's peak
# (a process that has just built a ledger) as the child's.
_REPORTING_PEAK = (
    "import sys\n"
    "from meter.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print(f'VmHWM {peak}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_with_peak(args: Sequence[str], timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], int | None]:
    """`meter ARGS` as a process: its result and its peak RSS in bytes (None when it did
    not succeed, or wrote more than the peak on stderr: the caller shows its stderr)."""
    result = subprocess.run([sys.executable, "-c", _REPORTING_PEAK, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    *errors, last = result.stderr.splitlines() or [""]
    if result.returncode != 0 or errors or not last.startswith("VmHWM "):
        return result, None
    return result, int(last.split()[1]) * 1024
