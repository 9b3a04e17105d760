"""Ledgers of many rows, made in one statement (for reprice's bounded-memory test and
scripts/bench_reprice.py): rows with usage and no cost, one every 37 seconds from
2026-01-01, total = input + output, so no usage invariant leaves a row unpriced and a
price override for `model` changes every one of them."""

from __future__ import annotations

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
