"""What `meter serve`'s proxy process holds: only what serving needs (issue #16's memory).

Every module a process imports stays in its memory for good (its code, its tables):
a real `meter serve` on its default settings, started with `-X importtime`, forwards
a request and answers a scrape; the modules it imported meanwhile must not include
what only other commands or switched-off features use.  And with glibc its threads
share one malloc arena (meter/runtime.py): none has a heap of its own in the
process's memory map.
"""

from __future__ import annotations

import itertools
import os
import platform
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


# glibc reserves each arena but the main one as a heap of this size, aligned to it:
# a read-write start and an inaccessible rest (/proc/PID/maps).
GLIBC_HEAP = 64 << 20


def thread_heaps(pid: int) -> list[str]:
    """The glibc arenas of `pid` besides the main one, as /proc/PID/maps shows them."""
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        spans.append((start, end, fields[1], len(fields) > 5))
    return [
        f"{start:x}"
        for (start, end, perms, named), (next_start, next_end, next_perms, _) in itertools.pairwise(spans)
        if not named and perms == "rw-p" and start % GLIBC_HEAP == 0 and next_start == end and next_perms == "---p" and next_end == start + GLIBC_HEAP
    ]


def test_meter_serve_imports_only_what_serving_needs(upstream, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "MALLOC_ARENA_MAX"}
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
        # The ledger writer, the spill thread and the DNS threads have run by now.
        heaps = thread_heaps(proc.pid) if platform.libc_ver()[0] == "glibc" else []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    modules = imported_modules(log.read_text())
    assert "meter.server" in modules and "aiohttp" in modules  # the log is the proxy's imports
    loaded = {top: why for top, why in NOT_AT_SERVE_TIME.items() if any(m == top or m.startswith(top + ".") for m in modules)}
    assert not loaded, f"meter serve imported {loaded}"
    assert not heaps, f"threads of meter serve have malloc arenas of their own at {heaps}"
