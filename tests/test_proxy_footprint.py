"""What `meter serve`'s proxy process loads: only what serving needs (issue #16's memory).

Every module a process imports stays in its memory for good (its code, its tables):
a real `meter serve` on its default settings, started with `-X importtime`, forwards
a request and answers a scrape; the modules it imported meanwhile must not include
what only other commands or switched-off features use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .conftest import ROOT, SECRET_KEY, free_port

# Module (or package) -> why `meter serve` on its defaults has no use for it.
NOT_AT_SERVE_TIME = {
    # meter writes /metrics itself (meter/metrics.py): ~1 MiB and 30 modules, its HTTP and WSGI servers among them.
    "prometheus_client": "the Prometheus client library",
    # Only when an OTEL_* variable asks for it (meter.server.telemetry_from_env).
    "opentelemetry": "OpenTelemetry's SDK",
}


def imported_modules(stderr: str) -> set[str]:
    """Module names from `-X importtime` lines (`import time: self | cumulative | name`)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}


def test_meter_serve_imports_only_what_serving_needs(upstream, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "meter", "serve", "--upstream", upstream.url, "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{admin_port}", "--ledger", str(tmp_path / "ledger.duckdb")],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2), urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "meter serve did not start"
                time.sleep(0.05)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/responses", data=b'{"model": "gpt-4o", "input": "hi"}',
            headers={"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as scrape:
            assert b"meter_requests_total" in scrape.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    modules = imported_modules(log.read_text())
    assert "meter.server" in modules and "aiohttp" in modules  # the log is the proxy's imports
    loaded = {top: why for top, why in NOT_AT_SERVE_TIME.items() if any(m == top or m.startswith(top + ".") for m in modules)}
    assert not loaded, f"meter serve imported {loaded}"
