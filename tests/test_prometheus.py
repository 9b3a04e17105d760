"""Every dashboard panel's PromQL, evaluated by a real Prometheus that scraped a real meter.

A Prometheus server (the `prometheus` binary; Debian package `prometheus`)
scrapes meter's admin port every second while mixed traffic goes through meter
to the fake provider.  Then each expression of each panel of each dashboard
under `dashboards/`, with its template variables substituted as Grafana would
(all models, all keys), goes through Prometheus's HTTP API: it must parse and
return at least one series.  A panel that shows nothing fails the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ROOT, free_port
from .dashboard_queries import all_values, load_dashboards, panel_queries, substitute
from .test_metrics import drive_mixed_traffic, scrape

DASHBOARDS = ROOT / "dashboards"
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval is at least 4 scrape intervals; 30 s holds every point of the run
TIME_RANGE = "5m"


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: meter\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 900ms\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    async def start(self, timeout: float = 20.0) -> None:
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
                try:
                    async with s.get(self.url + "/-/ready") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, Any]:
        async with session.post(self.url + "/api/v1/query", data={"query": expr, "time": f"{time.time():.3f}"}) as r:
            return await r.json()

    async def value(self, session: aiohttp.ClientSession, expr: str) -> float | None:
        answer = await self.query(session, expr)
        result = answer.get("data", {}).get("result") or []
        return float(result[0]["value"][1]) if result else None


def prometheus_binary() -> str:
    found = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not found:
        pytest.fail(
            "the `prometheus` binary is required for the dashboard test and was not found on PATH "
            "(Debian/Ubuntu: `apt-get install -y prometheus`; or set PROMETHEUS_BIN)",
            pytrace=False,
        )
    return found


@pytest.fixture
async def prometheus_for(tmp_path: Path):
    started: list[Prometheus] = []

    async def start(target: str) -> Prometheus:
        prom = Prometheus(prometheus_binary(), target, tmp_path)
        started.append(prom)
        await prom.start()
        return prom

    yield start
    for prom in started:
        prom.stop()


async def test_every_dashboard_panel_returns_data(upstream, start_meter, prometheus_for) -> None:
    queries = []
    for board in load_dashboards(DASHBOARDS):
        values = all_values(board)  # every variable at "All", as a fresh dashboard opens
        for title, expr in panel_queries(board):
            promql = substitute(expr, values, rate_interval=RATE_INTERVAL, time_range=TIME_RANGE)
            queries.append((board.get("title", "?"), title, promql))
    assert queries, f"no panel queries found under {DASHBOARDS}"

    meter = await start_meter(upstream.url, price_provider="openai")
    host, port = meter.meter.admin_address
    prom = await prometheus_for(f"{host}:{port}")
    sent = await drive_mixed_traffic(meter.url)
    await meter.flush()
    local = await scrape(meter.admin_url)
    assert local.value("meter_requests_total") == sent.total

    async with aiohttp.ClientSession() as s:
        # Wait until Prometheus holds the final counts, then a few more scrapes so
        # that rate() over the window has several points of every series.
        deadline = time.monotonic() + 20
        while await prom.value(s, "sum(meter_requests_total)") != sent.total:
            assert time.monotonic() < deadline, "Prometheus never scraped the final counts:\n" + prom.log.read_text()[-2000:]
            await asyncio.sleep(0.25)
        await asyncio.sleep(3)
        up = await prom.value(s, 'up{job="meter"}')
        assert up == 1.0

        failures: list[str] = []
        for dash_title, title, promql in queries:
            answer = await prom.query(s, promql)
            if answer.get("status") != "success":
                failures.append(f"[{dash_title}] {title!r}: {answer.get('errorType')}: {answer.get('error')}\n    {promql}")
            elif not answer["data"]["result"]:
                failures.append(f"[{dash_title}] {title!r}: no series\n    {promql}")
        assert not failures, f"{len(failures)} of {len(queries)} panel queries failed:\n" + "\n".join(failures)
