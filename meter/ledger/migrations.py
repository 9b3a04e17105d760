"""Schema migrations: one runner, one append-only list of steps for every dialect.

Each step has a name and, per dialect, the statements that make it; the runner
applies the steps a ledger has not recorded, each in its own transaction, and
records each in `_meter_migrations`, so a ledger made by any older meter opens
in a newer one and every step runs once.  Never edit or reorder a step that has
shipped: add a new one.  A ledger that records steps this meter does not know
was written by a newer meter; it still opens (with a warning), since steps only
ever add.

On PostgreSQL, replicas starting together take an advisory lock around the
whole run, so they migrate once; DDL runs only when something is missing, so a
replica may run as a role that can only read and insert.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .schema import CLAIM_RECORDED_USAGE_SQL, COLUMN_TYPES, DIALECTS, SQL_TYPES

log = logging.getLogger("meter.ledger")

# pg_advisory_lock key that serialises migrations between replicas ("meter" in ASCII).
MIGRATION_LOCK = 0x6D65746572


class MigrationConnection(Protocol):
    """What the runner needs of a connection: statements with `$1` parameters, run now."""

    dialect: str

    def execute(self, sql: str, *params: Any) -> None: ...

    def column(self, sql: str, *params: Any) -> list[Any]:
        """The first column of every row."""
        ...


@dataclass(frozen=True)
class Step:
    name: str
    statements: Mapping[str, tuple[str, ...]]  # dialect -> statements, run in order


def _requests_table(dialect: str) -> str:
    # DuckDB has no PRIMARY KEY: an index on random UUIDs halves its insert speed, and
    # ids stay unique because each batch goes in with an anti-join (DuckDBStore).
    # PostgreSQL's `ON CONFLICT (id)` needs the key.
    key = " PRIMARY KEY" if dialect == "postgresql" else ""
    types = SQL_TYPES[dialect]
    columns = ",\n  ".join(f"{name} {types[kind]}" + (key if name == "id" else "") for name, kind in COLUMN_TYPES.items())
    return f"CREATE TABLE IF NOT EXISTS requests (\n  {columns}\n)"


STEPS: list[Step] = [
    Step(
        "m001_requests",
        {
            "duckdb": (_requests_table("duckdb"),),
            "postgresql": (_requests_table("postgresql"), "CREATE INDEX IF NOT EXISTS requests_started_at ON requests (started_at)"),
        },
    ),
    Step(
        "m002_usage_claims",
        {
            "duckdb": (
                "CREATE TABLE IF NOT EXISTS usage_claims (response_id VARCHAR PRIMARY KEY, request_id UUID, claimed_at TIMESTAMPTZ DEFAULT current_timestamp)",
                CLAIM_RECORDED_USAGE_SQL,
            ),
            "postgresql": (
                "CREATE TABLE IF NOT EXISTS usage_claims (response_id text PRIMARY KEY, request_id uuid, claimed_at timestamptz DEFAULT now())",
                CLAIM_RECORDED_USAGE_SQL,
            ),
        },
    ),
    # SPEC §10: the session a row belongs to.  A ledger made since has the column from
    # m001 already (IF NOT EXISTS); an older one gets it at the end of the table, which is
    # why every store inserts by column name.  PostgreSQL indexes response_id: the writer
    # looks up the session of a chain's earlier response by it.
    Step(
        "m003_session_id",
        {
            "duckdb": ("ALTER TABLE requests ADD COLUMN IF NOT EXISTS session_id VARCHAR",),
            "postgresql": (
                "ALTER TABLE requests ADD COLUMN IF NOT EXISTS session_id text",
                "CREATE INDEX IF NOT EXISTS requests_response_id ON requests (response_id)",
            ),
        },
    ),
    # SPEC §11: a budget alert is claimed here before it is sent (meter/ledger/alert_claims.py).
    Step(
        "m004_alert_claims",
        {
            "duckdb": (
                (
                    "CREATE TABLE IF NOT EXISTS alert_claims (budget VARCHAR, window_start TIMESTAMPTZ, threshold DOUBLE, "
                    "spend_usd DECIMAL(18,9), limit_usd DECIMAL(18,9), mode VARCHAR, claimed_at TIMESTAMPTZ DEFAULT current_timestamp, "
                    "claimed_by VARCHAR, lease_until TIMESTAMPTZ, delivered VARCHAR, sent_at TIMESTAMPTZ, "
                    "PRIMARY KEY (budget, window_start, threshold))"
                ),
            ),
            "postgresql": (
                (
                    "CREATE TABLE IF NOT EXISTS alert_claims (budget text, window_start timestamptz, threshold double precision, "
                    "spend_usd numeric(18,9), limit_usd numeric(18,9), mode text, claimed_at timestamptz DEFAULT now(), "
                    "claimed_by text, lease_until timestamptz, delivered text, sent_at timestamptz, "
                    "PRIMARY KEY (budget, window_start, threshold))"
                ),
            ),
        },
    ),
]
assert all(set(step.statements) == set(DIALECTS) for step in STEPS), "every step is written for every dialect"

_TRACKING = {
    "duckdb": "CREATE TABLE IF NOT EXISTS _meter_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ DEFAULT current_timestamp)",
    "postgresql": "CREATE TABLE IF NOT EXISTS _meter_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
}
# On PostgreSQL from the catalog: information_schema lists only what the role has a
# privilege on, and a replica's role need not have one on the view (see the module doc).
_PRESENT = {
    "duckdb": (
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_name IN ('_meter_migrations', 'schema_version')"
    ),
    "postgresql": (
        "SELECT relname::text FROM pg_catalog.pg_class "
        "WHERE relnamespace = current_schema()::regnamespace AND relname IN ('_meter_migrations', 'schema_version')"
    ),
}
_VERSION_VIEW = "CREATE OR REPLACE VIEW schema_version AS SELECT count(*) AS version, max(name) AS latest FROM _meter_migrations"


def migrate(con: MigrationConnection, where: str) -> list[str]:
    """Apply the steps `con`'s ledger has not recorded; returns their names.  `where`
    names the ledger in the log (a path, or a URL without its password)."""
    locked = con.dialect == "postgresql"
    if locked:
        con.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        present = set(con.column(_PRESENT[con.dialect]))
        if "_meter_migrations" not in present:
            con.execute(_TRACKING[con.dialect])
        done = set(con.column("SELECT name FROM _meter_migrations"))
        applied = []
        for step in STEPS:
            if step.name not in done:
                _apply(con, step)
                applied.append(step.name)
        if applied:
            log.info("ledger %s: applied %s", where, ", ".join(applied))
        unknown = done - {step.name for step in STEPS}
        if unknown:
            log.warning("the ledger %s has migrations this meter does not know (%s): a newer meter wrote it", where, ", ".join(sorted(unknown)))
        if applied or "schema_version" not in present:
            con.execute(_VERSION_VIEW)
        return applied
    finally:
        if locked:
            con.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def _apply(con: MigrationConnection, step: Step) -> None:
    """One step and its record, in one transaction."""
    con.execute("BEGIN TRANSACTION")
    try:
        for sql in step.statements[con.dialect]:
            con.execute(sql)
        con.execute("INSERT INTO _meter_migrations (name) VALUES ($1)", step.name)
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection cannot roll back; the step's own error is the one to raise
            con.execute("ROLLBACK")
        raise
