"""A collector that does not answer must not hold back meter's stop.

On SIGTERM the addons stop in turn, the ledger writer (its last flush, or the spool
for records a failing ledger still holds) after the OpenTelemetry exporters.  An
OTLP export waits for its collector up to `OTEL_EXPORTER_OTLP_TIMEOUT` (10 s by
default, per export, with retries), so a collector that is down or silent held the
ledger's last flush back by that much for traces and again for metrics: past an
orchestrator's grace period, the process is killed with records still in memory.
Now the last exports get a moment, then go on in the background while the rest of
meter stops; the process still waits for them before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp

from .conftest import SECRET_KEY, ledger_rows

COLLECTOR_TIMEOUT_S = 8  # each export waits this long: the old stop took at least that


@contextlib.asynccontextmanager
async def silent_collector() -> AsyncIterator[str]:
    """An HTTP endpoint that accepts connections, reads what is sent and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_a_silent_collector_does_not_hold_back_the_ledger_at_stop(upstream, start_meter, monkeypatch) -> None:
    async with silent_collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", str(COLLECTOR_TIMEOUT_S))
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        meter = await start_meter(upstream.url)
        assert meter.meter.tracing is not None and meter.meter.otel_metrics is not None
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {SECRET_KEY}"}
            async with http.post(meter.url + "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers=headers) as answer:
                assert answer.status == 200
        started = time.monotonic()
        await meter.stop()
        took = time.monotonic() - started
    # Less than one exporter's timeout, let alone the two of them one after the other
    # (2 s of it are the last exports' own moment; the rest is room for a loaded machine).
    assert took < COLLECTOR_TIMEOUT_S - 2, f"stop took {took:.1f}s"
    [row] = ledger_rows(meter.ledger_path)  # flushed, and the ledger closed
    assert row["status_code"] == 200
