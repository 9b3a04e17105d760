"""`meter sql`: read-only SQL over the ledger, confined to its tables, on every store.

Each way out of the ledger a user's SQL could take is tried for real: on a
running `meter serve` (DuckDB, through `POST /api/sql` behind the admin token,
and `meter sql --url`), on a stopped DuckDB file, and on a real PostgreSQL
(tests/pg.py).  After the attempts the ledger is unchanged, no file was written
and the running meter still writes its records.
"""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meter.ledger.sql import SqlError
from meter.report.sql_command import sql_ledgers

from .conftest import SECRET_KEY
from .pg import pg_url, postgres  # noqa: F401
from .redirecting import redirect_elsewhere, run_meter_env
from .test_report import arun_meter, assert_one_line_error, run_meter, run_meters, seed, seeded_records

TOKEN = "sql-test-admin-token-0123456789"

# Every way out of a DuckDB ledger's tables, each refused; {tmp} is a scratch directory
# in which nothing may appear.
DUCKDB_REFUSED = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "COPY requests TO '{tmp}/out.csv'",
    "COPY (SELECT * FROM requests) TO '{tmp}/out.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{tmp}/export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{tmp}/evil.duckdb_extension'",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "SELECT * FROM query('ATTACH ''{tmp}/other2.duckdb'' AS o')",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET enable_external_access",
    "PRAGMA enable_profiling",
    "PRAGMA enable_external_access",
    "SELECT 1; DELETE FROM requests",
    "SELECT 1; SELECT 2",
    "DELETE FROM requests",
    "UPDATE requests SET cost_usd = 0",
    "INSERT INTO requests (id, started_at, finished_at, method, path, endpoint) SELECT uuid(), now(), now(), 'GET', '/', 'other'",
    "DROP TABLE requests",
    "CREATE TABLE stolen AS SELECT * FROM requests",
    "SELECT * FROM query('DELETE FROM requests RETURNING *')",
    "CHECKPOINT",
    "BEGIN TRANSACTION",
]


def hostile(tmp: Path) -> list[str]:
    return [sql.replace("{tmp}", str(tmp)) for sql in DUCKDB_REFUSED]


def assert_nothing_written(tmp: Path) -> None:
    assert sorted(p.name for p in tmp.iterdir()) == [], "a refused statement wrote a file"


# --- a stopped DuckDB file --------------------------------------------------------------------


def test_stopped_file_answers_and_refuses_every_way_out(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "ledger.duckdb", seeded_records())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = sql_ledgers([str(ledger)], "SELECT count(*), sum(cost_usd) FROM requests", 10, 10).rows
    assert before == [(len(seeded_records()), Decimal("0.015881000"))]
    for sql in hostile(scratch):
        with pytest.raises(SqlError) as refused:
            sql_ledgers([str(ledger)], sql, 10, 10)
        assert "\n" not in str(refused.value) and str(refused.value), sql
    assert_nothing_written(scratch)
    assert sql_ledgers([str(ledger)], "SELECT count(*), sum(cost_usd) FROM requests", 10, 10).rows == before
    # bounded in bytes as well as rows: 40 values of 1 MB stop at about 16 MiB
    big = sql_ledgers([str(ledger)], "SELECT repeat('x', 1000000) AS v FROM range(40)", 100, 30)
    assert big.truncated == "bytes" and 10 <= len(big.rows) <= 16
    # the ledger's other tables are its own, and readable
    assert sql_ledgers([str(ledger)], "SELECT count(*) FROM l1.usage_claims", 10, 10).rows[0][0] >= 0


def test_cli_on_a_file_prints_table_csv_json_and_one_line_errors(tmp_path: Path) -> None:
    ledger = str(seed(tmp_path / "ledger.duckdb", seeded_records()))
    sql = "SELECT coalesce(key_name, key_id) AS key, count(*) AS requests, sum(cost_usd) AS usd FROM requests GROUP BY ALL ORDER BY requests DESC, key NULLS LAST"
    # Every case is its own `meter sql` process; they run side by side (each reads the file read-only).
    as_json, as_csv, as_table, limited, *errors = run_meters(
        ["sql", sql, "--ledger", ledger, "--format", "json"],
        ["sql", sql, "--ledger", ledger, "--format", "csv"],
        ["sql", sql, "--ledger", ledger],
        ["sql", "SELECT * FROM range(50) r", "--ledger", ledger, "--format", "csv", "--limit", "7"],
        ["sql", "SELEC 1", "--ledger", ledger],
        ["sql", "SELECT * FROM read_csv('/etc/passwd')", "--ledger", ledger],
        ["sql", "DELETE FROM requests", "--ledger", ledger],
        ["sql", "SELECT 1; SELECT 2", "--ledger", ledger],
        ["sql", "SELECT count(*) FROM range(1000000000000) a, range(1000) b", "--ledger", ledger, "--timeout", "1"],
        ["sql", "SELECT 1", "--ledger", str(tmp_path / "missing.duckdb")],
    )
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout, parse_float=Decimal)
    assert rows[0] == {"key": "team-a", "requests": 5, "usd": Decimal("0.005266000")}
    assert sum(r["requests"] for r in rows) == len(seeded_records())
    assert as_csv.stdout.splitlines()[:2] == ["key,requests,usd", "team-a,5,0.005266000"]
    table = as_table.stdout.splitlines()
    assert table[0].split() == ["key", "requests", "usd"] and table[2].split() == ["team-a", "5", "0.005266"]
    # bounded: --limit, with a warning on stderr and stdout in its shape
    assert limited.returncode == 0 and limited.stdout.splitlines() == ["r", *map(str, range(7))]
    assert "--limit 7" in limited.stderr
    # bad SQL and refused statements: one line, exit 2, the database's own first line
    words = [("Parser Error", "SELEC"), ("Permission Error", "/etc/passwd"), ("only a SELECT",), ("one statement",), ("timeout",), ("no such file",)]
    assert len(errors) == len(words)
    for result, expected in zip(errors, words):
        assert_one_line_error(result, *expected)


# --- a running meter serve (DuckDB), through the admin API ---------------------------------------


async def post_sql(admin_url: str, sql: str, token: str | None = TOKEN, **extra: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(admin_url + "/api/sql", json={"sql": sql, **extra}, headers=headers) as r:
        return r.status, json.loads(await r.text(), parse_float=Decimal)


async def traffic(meter_url: str, n: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=meter_url + "/v1", api_key=SECRET_KEY, max_retries=0)
    try:
        for i in range(n):
            await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-usage": json.dumps({"input_tokens": 100 + i, "output_tokens": 10})})
    finally:
        await client.close()


async def test_live_duckdb_meter_answers_and_refuses_every_way_out(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "live.duckdb"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--admin-token", TOKEN, "--flush-interval", "0.05")
    await traffic(meter.url, 4)
    count_sql = "SELECT count(*) AS n, sum(input_tokens) AS input FROM requests"
    # the token guards it like every admin path
    status, _ = await post_sql(meter.admin_url, count_sql, token=None)
    assert status == 401
    status, answer = await post_sql(meter.admin_url, count_sql)
    assert status == 200, answer
    assert answer == {"columns": ["n", "input"], "truncated": None, "rows": [{"n": 4, "input": 406}]}
    for sql in hostile(scratch):
        status, answer = await post_sql(meter.admin_url, sql)
        assert status == 400, (sql, answer)
        assert answer["error"] and "\n" not in answer["error"], sql
    assert_nothing_written(scratch)
    assert (await post_sql(meter.admin_url, count_sql))[1]["rows"] == [{"n": 4, "input": 406}]
    # bounded in rows and in time; a timed-out query does not stop the writer
    status, answer = await post_sql(meter.admin_url, "SELECT * FROM range(100) r", limit=3)
    assert (status, answer["truncated"], answer["rows"]) == (200, "rows", [{"r": 0}, {"r": 1}, {"r": 2}])
    status, answer = await post_sql(meter.admin_url, "SELECT count(*) FROM range(1000000000000) a, range(1000) b", timeout=1)
    assert status == 400 and "timeout" in answer["error"]
    status, answer = await post_sql(meter.admin_url, "SELECT 1", limit="many")
    assert status == 400 and "limit" in answer["error"]
    # the confined ledger still takes the proxy's records (Arrow inserts), and the CLI reads them
    await traffic(meter.url, 2)
    env_token = {"METER_ADMIN_TOKEN": TOKEN}
    live = await arun_meter_env(env_token, "sql", count_sql, "--url", meter.admin_url, "--format", "json")
    assert live.returncode == 0, live.stderr
    assert json.loads(live.stdout) == [{"n": 6, "input": 406 + 100 + 101}]
    refused = await arun_meter_env(env_token, "sql", "SELECT * FROM read_text('/etc/passwd')", "--url", meter.admin_url)
    assert_one_line_error(refused, "Permission Error", "/etc/passwd")
    assert "root:" not in refused.stderr
    assert_one_line_error(await arun_meter("sql", count_sql, "--url", meter.admin_url), "401", "METER_ADMIN_TOKEN")
    assert_one_line_error(await arun_meter("sql", count_sql, "--url", meter.admin_url, "--config", str(tmp_path / "x.toml")), "--config", "--url")
    # the file is held: --ledger says to ask the running meter
    assert_one_line_error(await arun_meter("sql", count_sql, "--ledger", str(ledger)), "--url")
    meter.stop()
    stopped = run_meter("sql", count_sql, "--ledger", str(ledger), "--format", "json")
    assert stopped.stdout == live.stdout


async def arun_meter_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return await arun_meter(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- PostgreSQL --------------------------------------------------------------------------------

PG_REFUSED = [
    "SELECT pg_read_file('/etc/passwd')",
    'SELECT "pg_read_file"(\'/etc/passwd\')',
    "SELECT PG_CATALOG.PG_READ_BINARY_FILE('/etc/passwd')",
    "SELECT * FROM pg_ls_dir('/')",
    "SELECT pg_stat_file('/etc/passwd')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '/tmp/x')",
    "SELECT dblink('dbname=postgres', 'select 1')",
    "SELECT query_to_xml('select pg_read_file(''/etc/passwd'')', true, true, '')",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT set_config('role', 'postgres', true)",
    "SELECT current_setting('data_directory')",
    "SELECT txid_current()",
    'SELECT U&"lo\\005fcreate"(0)',  # a Unicode-escaped name: lo_create
    'SELECT u&"current\\005fsetting"(\'server_version\')',
    "SELECT U&'\\0070g_read_file'",  # an escaped string is refused too: nothing needs one
    "COPY requests TO PROGRAM 'id'",
    "COPY (SELECT 1) TO '/tmp/meter-sql-copy'",
    "COPY requests TO STDOUT",
    "SET ROLE postgres",
    "RESET ROLE",
    "SET default_transaction_read_only = off",
    "DELETE FROM requests",
    "UPDATE requests SET cost_usd = 0",
    "DROP TABLE requests",
    "CREATE TABLE stolen AS SELECT * FROM requests",
    "SELECT * INTO stolen FROM requests",
    "WITH gone AS (DELETE FROM requests RETURNING id) SELECT count(*) FROM gone",
    "SELECT 1; DELETE FROM requests",
    "SELECT 1; SELECT 2",
    "DO $$ BEGIN PERFORM 1; END $$",
    "CREATE EXTENSION dblink",
    "SELECT nextval('requests_id_seq')",
    "BEGIN",
]


def seeded_pg(url: str) -> None:
    from meter.ledger import PostgresStore

    store = PostgresStore(url)
    store.open()
    try:
        store.write(seeded_records())
    finally:
        store.close()


def test_postgres_answers_like_duckdb_and_refuses_every_way_out(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    seeded_pg(pg_url)
    ledger = str(seed(tmp_path / "ledger.duckdb", seeded_records()))
    sql = "SELECT coalesce(key_name, key_id) AS key, count(*) AS requests, sum(cost_usd) AS usd FROM requests GROUP BY 1 ORDER BY requests DESC, key NULLS LAST"
    count_sql = "SELECT count(*), sum(cost_usd) FROM requests"
    before = sql_ledgers([pg_url], count_sql, 10, 10).rows
    for attempt in PG_REFUSED:
        with pytest.raises(SqlError) as refused:
            sql_ledgers([pg_url], attempt, 10, 10)
        assert str(refused.value) and "\n" not in str(refused.value), attempt
    assert sql_ledgers([pg_url], count_sql, 10, 10).rows == before
    assert not Path("/tmp/meter-sql-copy").exists()
    # Every case is its own `meter sql` process; they run side by side.
    from_pg, from_duckdb, limited, *errors = run_meters(
        ["sql", sql, "--ledger", pg_url, "--format", "json"],
        ["sql", sql, "--ledger", ledger, "--format", "json"],
        ["sql", "SELECT * FROM generate_series(1, 40) g", "--ledger", pg_url, "--format", "csv", "--limit", "4"],
        ["sql", "SELECT * INTO stolen FROM requests", "--ledger", pg_url],
        ["sql", "SELECT pg_read_file('/etc/passwd')", "--ledger", pg_url],
        ["sql", "SELECT pg_sleep(5)", "--ledger", pg_url, "--timeout", "0.5"],
        ["sql", "SELECT FROM WHERE", "--ledger", pg_url],
        ["sql", "SELEC 1", "--ledger", pg_url],
    )
    assert from_pg.returncode == 0, from_pg.stderr
    assert from_pg.stdout == from_duckdb.stdout
    words = [("read-only transaction",), ("pg_read_file",), ("timeout",), ("syntax error",), ("only a query",)]
    assert len(errors) == len(words)
    for result, expected in zip(errors, words):
        assert_one_line_error(result, *expected)
    assert limited.stdout.splitlines() == ["g", "1", "2", "3", "4"] and "--limit 4" in limited.stderr


def test_postgres_role_meter_relies_on_cannot_read_files(pg_url: str) -> None:  # noqa: F811
    # What meter relies on beyond its name list: the ledger role is no superuser, so
    # PostgreSQL itself refuses the file functions (here with the text check bypassed).
    import asyncio

    import asyncpg

    async def attempt(sql: str) -> str:
        con = await asyncpg.connect(pg_url)
        try:
            assert not await con.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            async with con.transaction(readonly=True):
                await con.fetch(sql)
        except asyncpg.PostgresError as exc:
            return type(exc).__name__
        finally:
            await con.close()
        return "allowed"

    for sql in ("SELECT pg_read_file('/etc/passwd')", "SELECT lo_import('/etc/passwd')", "COPY (SELECT 1) TO PROGRAM 'id'"):
        assert asyncio.run(attempt(sql)) == "InsufficientPrivilegeError", sql


def test_a_postgres_query_is_rolled_back_whatever_it_ran(pg_url: str) -> None:  # noqa: F811
    """The name list is one wall; the other is that a reader's transaction never
    commits.  PostgreSQL runs lo_create in a READ ONLY transaction: with the text
    check bypassed, the large object it made is gone once the query is answered."""
    import asyncio

    import asyncpg

    from meter.ledger.sql import _postgres_sql

    async def large_objects() -> int:
        con = await asyncpg.connect(pg_url)
        try:
            return int(await con.fetchval("SELECT count(*) FROM pg_largeobject_metadata"))
        finally:
            await con.close()

    before = asyncio.run(large_objects())
    result = asyncio.run(_postgres_sql(pg_url, "SELECT lo_create(0) AS made", 10, 10, 1 << 20, 10))
    assert result.rows and result.rows[0][0] > 0  # it ran, and made one
    assert asyncio.run(large_objects()) == before


def test_postgres_sql_run_from_a_string_is_refused(postgres: Any, pg_url: str) -> None:  # noqa: F811
    """Functions that run SQL given as text (ts_stat, ts_rewrite, tablefunc's crosstab and
    connectby) take an expression, so any name can be assembled past the name list.  A
    reader's rolled-back transaction undoes most of what that reaches, not everything:
    pg_terminate_backend ends another session of the ledger's role at once, the
    serving meter's writer here."""
    from meter.ledger import PostgresStore

    postgres.psql("CREATE EXTENSION tablefunc", pg_url.rsplit("/", 1)[1])
    writer = PostgresStore(pg_url)
    writer.open()
    try:
        backend = writer._writer.run(lambda con: con.fetchval("SELECT pg_backend_pid()"), "test")
        terminate = f"to_tsvector(pg_terminate' || '_backend({backend})::text)"
        attempts = [
            f"SELECT * FROM ts_stat('SELECT {terminate}')",
            f"SELECT * FROM pg_catalog.TS_STAT('SELECT {terminate}', 'a')",
            f"SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, {terminate}::text::tsquery')",
            f"SELECT * FROM crosstab('SELECT 1::text, 1::text, {terminate}::text') AS t(a text, b text)",
            "SELECT * FROM connectby('requests', 'id', 'id', '1', 0) AS t(a uuid, b uuid, c int)",
        ]
        for attempt in attempts:
            with pytest.raises(SqlError, match="refused"):
                sql_ledgers([pg_url], attempt, 10, 10)
        # The writer's session is the one it had: nothing ended it.
        assert writer._writer.run(lambda con: con.fetchval("SELECT pg_backend_pid()"), "test") == backend
    finally:
        writer.close()


async def test_running_meter_on_postgres_answers_by_url(upstream, start_meter, pg_url: str) -> None:  # noqa: F811
    meter = await start_meter(upstream.url, ledger=pg_url)
    await traffic(meter.url, 3)
    status, answer = await post_sql(meter.admin_url, "SELECT count(*) AS n, sum(input_tokens) AS input FROM requests", token=None)
    assert (status, answer["rows"]) == (200, [{"n": 3, "input": 303}])
    status, answer = await post_sql(meter.admin_url, "SELECT pg_read_file('/etc/passwd')", token=None)
    assert status == 400 and "pg_read_file" in answer["error"]
    status, answer = await post_sql(meter.admin_url, "DELETE FROM requests", token=None)
    assert status == 400
    direct = await arun_meter("sql", "SELECT count(*) AS n FROM requests", "--ledger", pg_url, "--format", "json")
    assert json.loads(direct.stdout) == [{"n": 3}]


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_refused_and_the_admin_token_stays_home(status: int) -> None:
    """The query is a POST: urllib would follow a 302 as a GET (and a 307 as a POST),
    sending METER_ADMIN_TOKEN to whatever host the admin address names."""
    with redirect_elsewhere(status) as redirect:
        result = run_meter_env({"METER_ADMIN_TOKEN": "sql-SECRET"}, "sql", "SELECT 1", "--url", redirect.url)
    assert_one_line_error(result, "--url", redirect.url, f"HTTP {status}", "does not follow redirects")
    assert redirect.reached == [] and "sql-SECRET" not in result.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://[::1", "http://exa mple"])
def test_a_malformed_url_is_one_line(url: str) -> None:
    assert_one_line_error(run_meter("sql", "SELECT 1", "--url", url), "--url")
