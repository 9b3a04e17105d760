"""Two real HTTP servers for the tests that meter's clients never follow a redirect.

One answers every request with a redirect to the other, on another host name
(`localhost` instead of `127.0.0.1`), the way a hostile or misconfigured admin
address or provider could send a credential elsewhere; the other records each
request that reaches it, with its Authorization header.  The tests run the real
CLI against the first and assert that nothing reached the second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .conftest import ROOT

# What a test's environment must not inherit: its own credentials and settings are set per run.
_ISOLATED = ("METER_ADMIN_TOKEN", "OPENAI_ADMIN_KEY", "METER_CONFIG", "METER_UPSTREAM", "METER_LEDGER")


@dataclass
class Redirect:
    url: str  # the redirecting server, to give meter as --url or --upstream
    reached: list[dict[str, str]] = field(default_factory=list)  # requests the other server received


class _Handler(BaseHTTPRequestHandler):
    def _read_body(self) -> None:
        # read what was sent, so that the answer is not lost to a reset connection
        self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests assert on what reached the servers, not on their logs


def _recorder(reached: list[dict[str, str]]) -> type[BaseHTTPRequestHandler]:
    class Recorder(_Handler):
        def _answer(self) -> None:
            self._read_body()
            reached.append({"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization", "")})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        do_GET = do_POST = _answer

    return Recorder


def _redirector(status: int, elsewhere: int) -> type[BaseHTTPRequestHandler]:
    class Redirector(_Handler):
        def _answer(self) -> None:
            self._read_body()
            self.send_response(status)
            self.send_header("Location", f"http://localhost:{elsewhere}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

    return Redirector


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def redirect_elsewhere(status: int = 302) -> Iterator[Redirect]:
    """A server answering `status` with a Location on another host, whose requests are recorded."""
    reached: list[dict[str, str]] = []
    with _serving(_recorder(reached)) as elsewhere, _serving(_redirector(status, elsewhere)) as port:
        yield Redirect(f"http://127.0.0.1:{port}", reached)


def run_meter_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m meter ARGS` with exactly these credentials and settings from the environment."""
    clean = {k: v for k, v in os.environ.items() if k not in _ISOLATED}
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**clean, **env}
    )
