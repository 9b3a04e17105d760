"""Shared test parts: real processes and real files, no mocks of meter.

- `upstream`: the fake provider (`tests/fake_upstream.py`) as its own process.
- `start_meter`: a real `Meter` (proxy + admin ports, DuckDB file ledger) in the
  test's event loop, pointed at any upstream; stopped (and flushed) at teardown.
- `meter_process`: `meter serve` as a subprocess, for signals and CLI behaviour.
- `ledger_rows`: reads the `requests` table of a stopped meter's ledger file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest

from meter.config import load_settings
from meter.server import Meter

pytest_plugins = ["tests.pg"]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"  # recorded provider traffic: tests/fixtures/README.md

SECRET_KEY = "sk-test-DO-NOT-LEAK-7f3a9c2e41d8b6a5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UpstreamProcess:
    """A server started as `python -m <module>` that prints `READY <url>`."""

    def __init__(self, module: str = "tests.fake_upstream", args: list[str] | None = None) -> None:
        self.module = module
        self.args = args or []
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> UpstreamProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", "0", *self.args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY "):
                self.url = line.split()[1].strip()
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.module} did not start (exit {self.proc.poll()})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess().start()
    yield proc
    proc.stop()


async def upstream_requests(upstream_url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(upstream_url + "/__fake/requests") as r:
        return await r.json()


async def clear_upstream_requests(upstream_url: str) -> None:
    async with aiohttp.ClientSession() as s, s.delete(upstream_url + "/__fake/requests") as r:
        await r.read()


class RunningMeter:
    def __init__(self, meter: Meter, ledger: Path) -> None:
        self.meter = meter
        self.ledger_path = ledger
        self.stopped = False

    @property
    def url(self) -> str:
        host, port = self.meter.proxy_address  # type: ignore[misc]
        return f"http://{host}:{port}"

    @property
    def admin_url(self) -> str:
        host, port = self.meter.admin_address  # type: ignore[misc]
        return f"http://{host}:{port}"

    async def flush(self) -> None:
        """Wait until every finished request is written to the ledger.

        The client may hold its last byte before the handler has made the record,
        so first wait for the proxy to have nothing in flight.
        """
        if self.meter.proxy is not None:
            await asyncio.wait_for(self.meter.proxy.idle.wait(), 30)
        ok = await asyncio.get_running_loop().run_in_executor(None, self.meter.ledger.flush)
        assert ok, "ledger did not flush"

    async def rows(self, where: str = "true", params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Rows of the running ledger, read through the store the meter writes with."""
        await self.flush()
        sql = f"SELECT * FROM requests WHERE {where} ORDER BY started_at"
        names, rows = await asyncio.get_running_loop().run_in_executor(None, self.meter.store.query, sql, params or [])
        return [dict(zip(names, row)) for row in rows]

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.meter.stop()


@pytest.fixture
async def start_meter(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[RunningMeter] = []

    async def start(upstream_url: str, **overrides: Any) -> RunningMeter:
        ledger = overrides.pop("ledger", None) or str(tmp_path / f"ledger{len(started)}.duckdb")
        flags = {"upstream": upstream_url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "ledger": ledger, "flush_interval": 0.05}
        flags.update(overrides)
        extra = flags.pop("extra_addons", None)
        meter = Meter(load_settings(flags, env={}), extra_addons=extra)
        await meter.start()
        running = RunningMeter(meter, Path(ledger))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


def ledger_rows(path: Path | str, where: str = "true") -> list[dict[str, Any]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        res = con.execute(f"SELECT * FROM requests WHERE {where} ORDER BY started_at")
        names = [d[0] for d in res.description]
        return [dict(zip(names, row)) for row in res.fetchall()]
    finally:
        con.close()


class MeterProcess:
    """`meter serve` as a real subprocess."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.port = free_port()
        self.admin_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 20.0) -> MeterProcess:
        log = self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - outlives this call: closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meter", "serve", "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meter serve exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2):
                    pass
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("meter serve did not start listening")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture
def meter_process(tmp_path: Path) -> Iterator[Callable[..., MeterProcess]]:
    procs: list[MeterProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> MeterProcess:
        proc = MeterProcess(list(args), env=env, log_path=tmp_path / f"meter{len(procs)}.log").start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def load_fixture(name: str) -> dict[str, Any]:
    import json

    return json.loads((FIXTURES / "openai" / name).read_text())
