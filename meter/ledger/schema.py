"""The `requests` table and the rules about its rows, for every dialect.

- `COLUMN_TYPES`: each column's type (SPEC §4), written in DuckDB's names;
  `SQL_TYPES` gives each dialect's name for it.
- "Has usage": a row has usage when any of `USAGE_KNOWN` is known.
  `Record.has_usage` is the rule in Python; `HAS_USAGE_SQL` is the same rule
  in SQL, for reports, repricing and migrations (the ledger tests check that
  the two agree).
- Row ids: version 4 UUIDs, minted by the writer in bulk (`random_uuids`).
- The usage claim: only a background response can show the same usage on
  several rows (every poll after it ended), so its usage counts on the first
  row that claims its response id in `usage_claims`; `claim_usage` applies the
  rule to a batch, `CLAIM_RECORDED_USAGE_SQL` to rows already in a ledger.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..record import COLUMNS, Record

COLUMN_TYPES: dict[str, str] = {
    "id": "UUID",
    "started_at": "TIMESTAMPTZ",
    "finished_at": "TIMESTAMPTZ",
    "method": "VARCHAR",
    "path": "VARCHAR",
    "endpoint": "VARCHAR",
    "transport": "VARCHAR",
    "status_code": "INTEGER",
    "outcome": "VARCHAR",
    "stream": "BOOLEAN",
    "background": "BOOLEAN",
    "model_requested": "VARCHAR",
    "model": "VARCHAR",
    "response_id": "VARCHAR",
    "previous_response_id": "VARCHAR",
    "upstream_request_id": "VARCHAR",
    "service_tier_requested": "VARCHAR",
    "service_tier": "VARCHAR",
    "input_tokens": "BIGINT",
    "cached_tokens": "BIGINT",
    "cache_write_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "reasoning_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "web_search_calls": "BIGINT",
    "cache_status": "VARCHAR",
    "cache_missed_tokens": "BIGINT",
    "cost_usd": "DECIMAL(18,9)",
    "key_id": "VARCHAR",
    "key_hint": "VARCHAR",
    "key_name": "VARCHAR",
    "project": "VARCHAR",
    "user_id": "VARCHAR",
    "tags": "JSON",
    "session_id": "VARCHAR",
    "ttfb_ms": "DOUBLE",
    "ttft_ms": "DOUBLE",
    "duration_ms": "DOUBLE",
    "upstream_processing_ms": "DOUBLE",
    "request_bytes": "BIGINT",
    "response_bytes": "BIGINT",
    "error_type": "VARCHAR",
    "error_code": "VARCHAR",
    "trace_id": "VARCHAR",
}
assert tuple(COLUMN_TYPES) == COLUMNS, "ledger columns must follow the record"

SQL_TYPES: dict[str, dict[str, str]] = {
    "duckdb": {kind: kind for kind in set(COLUMN_TYPES.values())},
    "postgresql": {
        "UUID": "uuid",
        "TIMESTAMPTZ": "timestamptz",
        "VARCHAR": "text",
        "JSON": "jsonb",
        "DECIMAL(18,9)": "numeric(18,9)",
        "DOUBLE": "double precision",
        "BIGINT": "bigint",
        "INTEGER": "integer",
        "BOOLEAN": "boolean",
    },
}
DIALECTS = tuple(SQL_TYPES)

def select_from_batch(dialect: str) -> str:
    """The columns of a batch as the stores stage it (epoch seconds; UUIDs and JSON as
    text), each converted to the table's type, in the table's order."""
    types = SQL_TYPES[dialect]
    parts = []
    for name, kind in COLUMN_TYPES.items():
        if kind == "TIMESTAMPTZ":
            parts.append(f"to_timestamp({name})")
        elif kind in ("UUID", "JSON"):
            parts.append(f"{name}::{types[kind]}")
        else:
            parts.append(name)
    return ", ".join(parts)


USAGE_KNOWN: tuple[str, ...] = ("input_tokens", "output_tokens", "total_tokens")
HAS_USAGE_SQL = "(" + " OR ".join(f"{name} IS NOT NULL" for name in USAGE_KNOWN) + ")"


def needs_claim(record: Record) -> bool:
    """Only background responses can show the same usage on several rows (every poll
    after the end); a foreground response's usage is its creating request's alone."""
    return record.background and record.response_id is not None and record.has_usage


def claim_usage(records: Sequence[Record], already_claimed: set[str]) -> list[tuple[str, str]]:
    """Keep usage on the first row of each background response id; clear it on the rest.

    Returns the (response_id, request id) claims to store.  Pure, so every store shares it.
    """
    claims: list[tuple[str, str]] = []
    seen = already_claimed
    for record in records:
        rid = record.response_id
        if rid is None or not needs_claim(record):
            continue
        if rid in seen:
            record.clear_usage()
        else:
            seen.add(rid)
            claims.append((rid, record.id or ""))
    return claims


# Usage of background responses already in a ledger is claimed by each response's
# earliest row, so that a retrieve after the claims table appears does not count it
# again.  The same text on DuckDB and PostgreSQL.
CLAIM_RECORDED_USAGE_SQL = (
    "INSERT INTO usage_claims (response_id, request_id, claimed_at) "
    "SELECT DISTINCT ON (response_id) response_id, id, started_at FROM requests "
    f"WHERE {HAS_USAGE_SQL} "
    "AND response_id IN (SELECT response_id FROM requests WHERE background) "
    "ORDER BY response_id, started_at, id "
    "ON CONFLICT DO NOTHING"
)


# A random byte to a UUID's variant digit (8, 9, a or b: its top bits 10), as bytes.translate takes it.
_VARIANT = bytes(b"89ab"[byte & 3] for byte in range(256))
_UUID_LINE = "xxxxxxxx-xxxx-4xxx-Vxxx-xxxxxxxxxxxx\n"  # x: a random hex digit; V: the variant
_VARIANT_AT = _UUID_LINE.index("V")


def mint_ids(records: Sequence[Record]) -> None:
    """An id for each record that has none, minted before its first write attempt, so
    that a retried batch carries the same ids and stays idempotent."""
    missing = [record for record in records if record.id is None]
    for record, id_ in zip(missing, random_uuids(len(missing))):
        record.id = id_


def random_uuids(n: int, prefix: str = "") -> list[str]:
    """`n` random (version 4) UUIDs as strings, from one read of the OS's randomness;
    with `prefix` (a UUID's first characters, such as a budget's `xxxxxxxx-xxxx` mark),
    each starts with it and the rest is random.

    Built column by column in one buffer, a slice assignment per character position:
    `str(uuid.uuid4())` per record made a system call and a UUID object each (the
    writer thread's largest cost once), and a formatted string per id ~0.5 us.
    """
    line = (prefix + _UUID_LINE[len(prefix) :]).encode("ascii")
    width = len(line)
    random_at = [at for at in range(len(prefix), width) if line[at] == ord("x")]
    per_id, total = len(random_at), len(random_at) * n
    buf = bytearray(line * n)
    digits = os.urandom((total + 1) // 2).hex().encode("ascii")
    for column, at in enumerate(random_at):
        buf[at::width] = digits[column:total:per_id]
    buf[_VARIANT_AT::width] = os.urandom(n).translate(_VARIANT)
    ids = buf.decode("ascii").split("\n")
    ids.pop()  # after the last line end
    return ids
