"""The interpreter `meter serve` runs in (meter/runtime.py): its collector, seen from outside.

The request path makes no cyclic garbage, so the collector's runs are pure cost on
the event loop; `meter serve` freezes start-up's objects and raises the young
threshold.  A real `meter serve` under real requests shows it in its own
`python_gc_collections_total` (at Python's defaults a young collection ran every
~15-40 requests).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from .conftest import SECRET_KEY

REQUESTS = 3000


async def gc_collections(admin_url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(admin_url + "/metrics") as r:
        text = await r.text()
    runs = {}
    for line in text.splitlines():
        if line.startswith("python_gc_collections_total{"):
            generation = line.split('generation="', 1)[1].split('"', 1)[0]
            runs[generation] = float(line.rsplit(" ", 1)[1])
    assert set(runs) == {"0", "1", "2"}, text[:500]
    return runs


async def test_the_collector_runs_rarely_under_load(upstream, meter_process, tmp_path: Path) -> None:
    meter = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "ledger.duckdb"))
    body = b'{"model": "gpt-4o", "input": "hi"}'
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}
    before = await gc_collections(meter.admin_url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:

        async def one() -> None:
            async with http.post(meter.url + "/v1/responses", data=body, headers=headers) as r:
                assert r.status == 200
                await r.read()

        for start in range(0, REQUESTS, 500):
            await asyncio.gather(*(one() for _ in range(min(500, REQUESTS - start))))
    after = await gc_collections(meter.admin_url)
    young = after["0"] - before["0"]
    # 50,000 net new objects between young collections: a handful over 3,000
    # requests, where Python's default threshold (700) made 75-200.
    assert young <= REQUESTS / 100, f"{young:.0f} young collections over {REQUESTS} requests"
    assert after["2"] - before["2"] <= 2


def test_opentelemetry_loads_only_when_an_otel_variable_asks_for_it(monkeypatch) -> None:
    """OpenTelemetry's SDK costs a proxy that exports nothing a few MiB: `meter serve`
    imports it only when some `OTEL_*` variable is set."""
    import subprocess
    import sys

    from meter.config import Settings
    from meter.server import telemetry_from_env

    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    probe = "import sys, meter.cli, meter.server; print(sorted(m for m in sys.modules if m.startswith('opentelemetry'))[:3])"
    loaded = subprocess.run([sys.executable, "-c", probe], env=clean, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    settings = Settings(upstream="http://127.0.0.1:9")
    assert telemetry_from_env(settings) == (None, None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    otel_metrics, tracing = telemetry_from_env(settings)
    assert otel_metrics is None and type(tracing).__name__ == "Tracing"
    tracing.provider.shutdown()
