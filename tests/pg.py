"""A real PostgreSQL server for tests: initdb in a temporary directory, on a free loopback port.

    with PostgresServer() as pg:
        pg.url             # postgresql://meter:PASSWORD@127.0.0.1:PORT/meter
        pg.new_database()  # a fresh, empty database owned by `meter`; its URL
        pg.stop(); pg.start()  # an outage: same port, same data

The server binaries refuse to run as root, so as root every server command runs
as the `postgres` OS user (`runuser`), in a directory it owns; as anyone else
they run directly.  fsync is off: these clusters are thrown away.

Fixtures: `postgres` (one server per session, shared by every module that
imports it) and `pg_url` (a fresh database per test).  Use them with
`from .pg import pg_url, postgres  # noqa: F401`, or list `tests.pg` in the root
conftest's `pytest_plugins`.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Self

import asyncpg
import pytest

from meter.ledger import COLUMN_TYPES
from meter.record import COLUMNS, Record

PREFERRED_VERSION = "15"
SERVER_USER = "postgres"
ROLE = "meter"


def find_bin_dir() -> Path:
    """The directory with initdb/pg_ctl/postgres: $METER_PG_BIN, else PostgreSQL 15, else the newest installed."""
    explicit = os.environ.get("METER_PG_BIN")
    candidates = [explicit] if explicit else []
    candidates.append(f"/usr/lib/postgresql/{PREFERRED_VERSION}/bin")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return Path(candidate)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) not found under /usr/lib/postgresql/*/bin or on PATH; "
        "install them (`apt-get install postgresql-15`, or Debian's `postgresql`) or set METER_PG_BIN"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One throwaway PostgreSQL cluster.  Start with `start()` or `with`; `cleanup()` removes it."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = find_bin_dir()
        self.port = port or _free_port()
        self.password = "pgpw-" + secrets.token_hex(12)  # distinctive, so leak checks mean something
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="meter-pg-"))
        if self.as_root:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(f"running as root but there is no {SERVER_USER!r} OS user to run the PostgreSQL server as") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._initialised = False
        self.running = False
        self._databases = 0

    # commands ------------------------------------------------------------------

    def _cmd(self, tool: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / tool), *args]
        if self.as_root:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        proc = subprocess.run(argv, cwd=self.dir, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}{self._log_tail()}")
        return proc

    def _log_tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace") if self.as_root or self.log.exists() else ""
        except OSError:
            return ""
        return ("\n--- server log ---\n" + "\n".join(text.splitlines()[-20:])) if text else ""

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket."""
        proc = self._cmd("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p", str(self.port), "-U", SERVER_USER, "-d", database, "-c", sql)
        return proc.stdout.strip()

    # life cycle ----------------------------------------------------------------

    def _init(self) -> None:
        self._cmd("initdb", "-D", str(self.data), "-U", SERVER_USER, "-E", "UTF8", "--locale=C", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256")
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        conf = "".join(f"{k} = {v}\n" for k, v in settings.items())
        # As root the data directory belongs to postgres (mode 0700); append as that user.
        if self.as_root:
            subprocess.run(["runuser", "-u", SERVER_USER, "--", "sh", "-c", f"cat >> '{self.data}/postgresql.conf'"], input=conf, text=True, check=True)
        else:
            with open(self.data / "postgresql.conf", "a") as f:
                f.write(conf)
        self._initialised = True

    def start(self) -> Self:
        first = not self._initialised
        if first:
            self._init()
        self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.running = True
        if first:
            self.psql(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}'")
            self.psql(f"CREATE DATABASE {ROLE} OWNER {ROLE}")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` ends sessions; `immediate` is a crash)."""
        if self.running:
            self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # addresses -----------------------------------------------------------------

    def url_for(self, database: str) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for(ROLE)

    def new_database(self, prefix: str = "t") -> str:
        """A fresh empty database owned by the `meter` role; returns its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url_for(name)

    def rows(self, sql: str, database: str = ROLE) -> list[list[str]]:
        """Result rows of a query as text fields ('|'-separated by psql), for checks outside meter."""
        out = self.psql(sql, database)
        return [line.split("|") for line in out.splitlines() if line]


_shared: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One server for the whole session, however many test modules import this fixture."""
    global _shared, _users
    if _shared is None:
        try:
            server = PostgresServer()
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            server.start()
        except Exception:
            server.cleanup()
            raise
        _shared = server
    _users += 1
    try:
        if not _shared.running:  # a test that simulated an outage failed before restarting it
            _shared.start()
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.cleanup()
            _shared = None


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh database per test, on the session's server (restarted if a test left it stopped)."""
    if not postgres.running:
        postgres.start()
    return postgres.new_database()


def execute(url: str, sql: str, args: Sequence[Sequence[Any]] = ()) -> None:
    """Run a statement outside meter, once, or once per argument tuple: to set up a
    ledger as an older meter left it, or to break one under a running store."""

    async def run() -> None:
        con = await asyncpg.connect(url)
        try:
            if args:
                await con.executemany(sql, args)
            else:
                await con.execute(sql)
        finally:
            await con.close()

    asyncio.run(run())


# --- records for ledger tests (any store) -------------------------------------------


def full_record(i: int = 0, **overrides: Any) -> Record:
    """A record with every column set to something a lossy store would get wrong."""
    t = 1_764_000_000.123456 + i
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "started_at": t,
        "finished_at": t + 1.5,
        "method": "POST",
        "path": f"/v1/responses?beta=true&i={i}",
        "endpoint": "responses",
        "transport": "websocket",
        "status_code": 201,
        "outcome": "incomplete",
        "stream": True,
        "background": True,
        "model_requested": "gpt-5 ✨",
        "model": "gpt-5-2026-01-01",
        "response_id": f"resp_{i}_{uuid.uuid4().hex}",
        "previous_response_id": "resp_prev_é",
        "upstream_request_id": "req_123",
        "service_tier_requested": "fast",
        "service_tier": "priority",
        "input_tokens": 2**40 + i,
        "cached_tokens": 7,
        "cache_write_tokens": 3,
        "output_tokens": 11,
        "reasoning_tokens": 5,
        "total_tokens": 2**40 + i + 11,
        "web_search_calls": 2,
        "cache_status": "miss:prefix_changed",
        "cache_missed_tokens": 9,
        "cost_usd": Decimal("123456789.123456789"),
        "key_id": "0123456789abcdef",
        "key_hint": "sk-...wxyz",
        "key_name": "team-搜索",
        "project": "proj_1",
        "user_id": "user-1",
        "tags": json.dumps({"team": "search", "nested": {"n": [1, 2.5, None, True]}, "ünï": "✓"}),
        "ttfb_ms": 12.345678,
        "ttft_ms": 23.5,
        "duration_ms": 1500.25,
        "upstream_processing_ms": 9.0,
        "request_bytes": 2**33,
        "response_bytes": 0,
        "error_type": "server_error",
        "error_code": "overloaded",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }
    return Record(**{**fields, **overrides})


def bare_record(i: int = 0, **overrides: Any) -> Record:
    """Only what every record has: every optional column NULL."""
    t = time.time()
    fields: dict[str, Any] = {"id": str(uuid.uuid4()), "started_at": t, "finished_at": t + 0.01, "method": "GET", "path": f"/v1/models?{i}", "endpoint": "other"}
    return Record(**{**fields, **overrides})


def usage_record(response_id: str, *, input_tokens: int = 10, output_tokens: int = 5, **overrides: Any) -> Record:
    """A retrieve of a finished background response: the rows whose usage is claimed."""
    fields: dict[str, Any] = {
        "response_id": response_id,
        "endpoint": "responses.retrieve",
        "background": True,
        "status_code": 200,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "cost_usd": Decimal("0.000015"),
    }
    return bare_record(**{**fields, **overrides})


def assert_rows_match(records: Sequence[Record], rows: Sequence[dict[str, Any]]) -> None:
    """Every column of every row equals its record, read back through a real ledger."""
    by_id = {str(row["id"]): row for row in rows}
    assert sorted(by_id) == sorted(str(r.id) for r in records)
    for record in records:
        row = by_id[str(record.id)]
        assert list(row) == list(COLUMNS)
        for name in COLUMNS:
            want, got, kind = getattr(record, name), row[name], COLUMN_TYPES[name]
            where = f"{name} of {record.id}"
            if want is None:
                assert got is None, where
            elif kind == "UUID":
                assert isinstance(got, uuid.UUID) and str(got) == want, where
            elif kind == "TIMESTAMPTZ":
                assert got.tzinfo is not None and abs(got.timestamp() - want) < 2e-6, where
            elif kind == "JSON":
                assert json.loads(got) == json.loads(want), where
            elif kind == "DECIMAL(18,9)":
                assert isinstance(got, Decimal) and got == want, where
            else:
                assert type(got) is type(want) and got == want, where


# --- streaming reads and cost rewrites (any store) ------------------------------------

# `n` rows with a cost, generated by the database itself (one statement, not n inserts).
FILL_DUCKDB = (
    "INSERT INTO requests (id, started_at, finished_at, method, path, endpoint, input_tokens, cost_usd) "
    "SELECT uuid(), to_timestamp(1764000000 + i), to_timestamp(1764000001 + i), 'POST', '/v1/responses', 'responses', 10, 0.000001 "
    "FROM range({n}) t(i)"
)
FILL_POSTGRES = (
    "INSERT INTO requests (id, started_at, finished_at, method, path, endpoint, input_tokens, cost_usd) "
    "SELECT gen_random_uuid(), to_timestamp(1764000000 + i), to_timestamp(1764000001 + i), 'POST', '/v1/responses', 'responses', 10, 0.000001 "
    "FROM generate_series(1, {n}) i"
)


class Boom(Exception):
    pass


def check_streamed_cost_rewrite(store: Any, n: int, batch_rows: int) -> None:
    """`set_costs` fed by an `iter_query` of the same store, as `meter reprice` does:
    batches never exceed `batch_rows`, Python memory stays far below the result's size,
    a failure part-way changes nothing, and a complete run rewrites every row once."""
    import tracemalloc

    store.cost_chunk_rows = batch_rows * 2
    sizes: list[int] = []

    def changes(fail_after: int | None = None) -> Iterator[tuple[str, Decimal | None]]:
        taken = 0
        for batch in store.iter_query("SELECT id::VARCHAR AS id, cost_usd FROM requests ORDER BY started_at", (), batch_rows=batch_rows):
            sizes.append(len(batch))
            for id_, cost in batch:
                if taken == fail_after:
                    raise Boom("the pricer failed")
                taken += 1
                yield id_, cost + Decimal("0.000000001")

    with pytest.raises(Boom):
        store.set_costs(changes(fail_after=n // 2))
    assert store.query("SELECT sum(cost_usd) FROM requests")[1] == [(Decimal("0.000001") * n,)]  # rolled back
    sizes.clear()
    tracemalloc.start()
    try:
        updated = store.set_costs(changes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert updated == n
    assert sum(sizes) == n and max(sizes) == batch_rows and len(sizes) == -(-n // batch_rows)
    # The whole result as Python rows would take ~200 bytes a row; one batch and one chunk far less.
    assert peak < 200 * n / 5, f"peak {peak / 1e6:.1f} MB for {n} rows"
    assert store.query("SELECT sum(cost_usd), count(*) FROM requests")[1] == [(Decimal("0.000001000") * n + Decimal("0.000000001") * n, n)]
