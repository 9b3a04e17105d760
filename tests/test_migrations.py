"""Ledger schema migrations: a ledger made by an older meter opens in a newer one.

The "first schema" fixtures build a ledger the way a meter that knew only the
first step (`m001_requests`) would have, with rows in it, through the stores'
own migration functions; the current store then opens it, applies the rest,
and every old row must still read back as written.
"""

# Fixtures imported by name come back as test parameters:

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest

from meter.ledger import COLUMN_TYPES, SQL_TYPES, DuckDBStore, PostgresStore, migrations
from meter.ledger.duckdb_store import batch_parameters, batch_select
from meter.ledger.schema import select_from_batch
from meter.record import COLUMNS, Record

from .pg import PostgresServer, assert_rows_match, bare_record, execute, full_record, usage_record

SHIPPED = ["m001_requests", "m002_usage_claims"]  # append-only: never renamed, reordered or removed


def old_records() -> list[Record]:
    return [full_record(i) for i in range(3)] + [bare_record(i) for i in range(2)]


STEP_NAMES = [step.name for step in migrations.STEPS]


def test_migration_list_is_append_only_and_written_for_every_dialect() -> None:
    assert STEP_NAMES[: len(SHIPPED)] == SHIPPED
    assert all(set(step.statements) == {"duckdb", "postgresql"} for step in migrations.STEPS)


# --- DuckDB ------------------------------------------------------------------------


@pytest.fixture
def duckdb_first_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Record]]:
    """A DuckDB ledger as a meter with only the first migration left it, with rows."""
    path = tmp_path / "first.duckdb"
    records = old_records()
    store = DuckDBStore(str(path))
    with monkeypatch.context() as m:
        m.setattr(migrations, "STEPS", migrations.STEPS[:1])
        store.open()
    con = store.con
    try:
        assert [r[0] for r in con.execute("SELECT name FROM _meter_migrations").fetchall()] == ["m001_requests"]
        given, columns = batch_parameters(records)  # as the store stages a batch
        con.execute(f"INSERT INTO requests SELECT {select_from_batch('duckdb')} FROM ({batch_select(given)}) AS batch", columns)
        assert {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()} >= {"requests", "_meter_migrations"}
        assert "usage_claims" not in {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        store.close()
    return path, copy.deepcopy(records)


def store_rows(store: DuckDBStore | PostgresStore) -> list[dict[str, Any]]:
    names, rows = store.query("SELECT * FROM requests ORDER BY started_at")
    return [dict(zip(names, row)) for row in rows]


def test_duckdb_first_schema_upgrades_in_place(duckdb_first_schema: tuple[Path, list[Record]], caplog: pytest.LogCaptureFixture) -> None:
    path, records = duckdb_first_schema
    store = DuckDBStore(str(path))
    with caplog.at_level(logging.INFO, logger="meter.ledger"):
        store.open()
    try:
        assert "applied m002_usage_claims" in caplog.text
        assert_rows_match(records, store_rows(store))
        applied = [r[0] for r in store.query("SELECT name FROM _meter_migrations ORDER BY name")[1]]
        assert applied == STEP_NAMES
        assert store.query("SELECT version, latest FROM schema_version")[1] == [(len(STEP_NAMES), STEP_NAMES[-1])]
        new = [usage_record("resp_after_upgrade"), usage_record("resp_after_upgrade")]
        store.write(copy.deepcopy(new))
        after = {str(r["id"]): r for r in store_rows(store)}
        assert len(after) == len(records) + 2
        assert [after[r.id]["input_tokens"] for r in new] == [10, None]
    finally:
        store.close()
    reopened = DuckDBStore(str(path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meter.ledger"):
        reopened.open()
    try:
        assert "applied" not in caplog.text  # each step once
        assert reopened.query("SELECT count(*) FROM _meter_migrations")[1] == [(len(STEP_NAMES),)]
    finally:
        reopened.close()


# --- PostgreSQL ----------------------------------------------------------------------


def _insert_sql() -> str:
    values = []
    for i, (name, kind) in enumerate(COLUMN_TYPES.items(), start=1):
        values.append(f"to_timestamp(${i})" if kind == "TIMESTAMPTZ" else f"${i}::{SQL_TYPES['postgresql'][kind]}")
    return f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join(values)})"


@pytest.fixture
def pg_first_schema(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[Record]]:
    """A PostgreSQL ledger as a meter with only the first migration left it, with rows."""
    records = old_records()
    with monkeypatch.context() as m:
        m.setattr(migrations, "STEPS", migrations.STEPS[:1])
        store = PostgresStore(pg_url)
        store.open()
    try:
        execute(pg_url, _insert_sql(), [[getattr(r, c) for c in COLUMNS] for r in records])
        _, tables = store.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")
        assert [t[0] for t in tables] == ["_meter_migrations", "requests", "schema_version"]
        assert store.query("SELECT version, latest FROM schema_version")[1] == [(1, "m001_requests")]
    finally:
        store.close()
    return pg_url, copy.deepcopy(records)


def pg_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    store = PostgresStore(url, migrate=False)
    try:
        return store.query(sql)[1]
    finally:
        store.close()


def test_postgres_first_schema_upgrades_in_place(pg_first_schema: tuple[str, list[Record]], caplog: pytest.LogCaptureFixture) -> None:
    url, records = pg_first_schema
    store = PostgresStore(url)
    with caplog.at_level(logging.INFO, logger="meter.ledger"):
        store.open()
    try:
        assert "applied m002_usage_claims" in caplog.text
        names, rows = store.query("SELECT * FROM requests ORDER BY started_at")
        assert_rows_match(records, [dict(zip(names, row)) for row in rows])
        assert [r[0] for r in store.query("SELECT name FROM _meter_migrations ORDER BY name")[1]] == STEP_NAMES
        assert store.query("SELECT version, latest FROM schema_version")[1] == [(len(STEP_NAMES), STEP_NAMES[-1])]
        # Usage the old meter recorded is claimed by its row: polling that response
        # again after the upgrade does not count it twice.
        old_usage = records[0]
        again = usage_record(old_usage.response_id, input_tokens=999)  # type: ignore[arg-type]
        fresh = usage_record("resp_new", input_tokens=5)
        store.write([again, fresh])
        got = {str(r[0]): r[1] for r in store.query("SELECT id, input_tokens FROM requests")[1]}
        assert got[again.id] is None and got[fresh.id] == 5 and got[old_usage.id] == old_usage.input_tokens
    finally:
        store.close()
    reopened = PostgresStore(url)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meter.ledger"):
        reopened.open()
    reopened.close()
    assert "applied" not in caplog.text  # each step once
    assert pg_query(url, "SELECT count(*) FROM _meter_migrations") == [(len(STEP_NAMES),)]


def test_postgres_replicas_starting_together_migrate_once(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    n = 6
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []
    stores = [PostgresStore(url) for _ in range(n)]

    def start(store: PostgresStore) -> None:
        try:
            barrier.wait()
            store.open()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        stores[0].write([full_record()])
    finally:
        for store in stores:
            store.close()
    assert pg_query(url, "SELECT name, count(*) FROM _meter_migrations GROUP BY name ORDER BY name") == [(name, 1) for name in STEP_NAMES]
    assert pg_query(url, "SELECT count(*) FROM requests") == [(1,)]


def test_postgres_ledger_from_a_newer_meter_still_opens(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = PostgresStore(pg_url)
    store.open()
    store.close()
    execute(pg_url, "INSERT INTO _meter_migrations (name) VALUES ($1)", [("m999_from_the_future",)])
    with caplog.at_level(logging.WARNING, logger="meter.ledger"):
        store = PostgresStore(pg_url)
        store.open()
    try:
        store.write([bare_record()])
    finally:
        store.close()
    assert "m999_from_the_future" in caplog.text


def test_postgres_migrated_ledger_runs_under_a_role_without_ddl_rights(postgres: PostgresServer) -> None:
    """Migrations by the owner; replicas may then run as a role that can only read and insert
    the tables it writes: not the `schema_version` view, which is there for people (a
    role without a grant on it does not see it in information_schema, and meter then
    tried to make it again: permission denied, and that replica never wrote)."""
    url = postgres.new_database()
    owner = PostgresStore(url)
    owner.open()
    owner.close()
    database = url.rsplit("/", 1)[1]
    postgres.psql("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'meter_writer') THEN CREATE ROLE meter_writer LOGIN PASSWORD 'writer-pw'; END IF; END $$")
    postgres.psql(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
        "GRANT SELECT, INSERT ON requests, usage_claims, _meter_migrations TO meter_writer",
        database,
    )
    writer_url = url.replace(f"meter:{postgres.password}@", "meter_writer:writer-pw@")
    store = PostgresStore(writer_url)
    try:
        store.open()
        store.write([usage_record("resp_writer"), usage_record("resp_writer")])
        assert sorted(r[0] or 0 for r in store.query("SELECT input_tokens FROM requests")[1]) == [0, 10]
    finally:
        store.close()


def test_duckdb_upgrade_claims_usage_already_recorded(duckdb_first_schema: tuple[Path, list[Record]]) -> None:
    """As on PostgreSQL: usage an older meter recorded is claimed by its row, so polling
    that response again after the upgrade does not count it twice."""
    path, records = duckdb_first_schema
    old_usage = records[0]
    store = DuckDBStore(str(path))
    store.open()
    try:
        again = usage_record(old_usage.response_id, input_tokens=999)  # type: ignore[arg-type]
        fresh = usage_record("resp_new", input_tokens=5)
        store.write([again, fresh])
    finally:
        store.close()
    con = duckdb.connect(str(path))
    try:
        got = {str(r[0]): r[1] for r in con.execute("SELECT id, input_tokens FROM requests").fetchall()}
    finally:
        con.close()
    assert got[again.id] is None and got[fresh.id] == 5 and got[old_usage.id] == old_usage.input_tokens
