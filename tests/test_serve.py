"""`meter serve` as users run it: a real process, real signals, a real DuckDB file."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from .conftest import ROOT, SECRET_KEY, free_port, ledger_rows
from .test_report import run_meters


def run_meter(*args: str, timeout: float = 30, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meter", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, input=stdin)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_help_lists_every_setting() -> None:
    result = run_meter("serve", "--help")
    assert result.returncode == 0
    for flag in ("--upstream", "--listen", "--admin-listen", "--ledger", "--config", "--metrics-max-keys", "--metrics-key-label", "--max-request-bytes", "--shutdown-grace", "--client-timeout", "--max-metered-bytes", "--admin-token", "--admin-insecure"):
        assert flag in result.stdout
    top = run_meter("--help")
    assert top.returncode == 0 and "serve" in top.stdout


def test_bad_settings_end_startup_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("upstream = [unterminated")
    cases: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("serve", "--upstream", "not a url", "--ledger", str(tmp_path / "l.duckdb")), ("upstream",)),
        (("serve", "--listen", "127.0.0.1:notaport", "--ledger", str(tmp_path / "l.duckdb")), ("listen",)),
        (("serve", "--config", str(tmp_path / "missing.toml")), ("config",)),
        (("serve", "--config", str(bad)), ("config",)),
        (("serve", "--no-such-flag"), ("--no-such-flag",)),
        (("bogus",), ()),
    ]
    # Refused while reading the settings, before a ledger or a port is opened: side by side, each its own process.
    for (_, words), result in zip(cases, run_meters(*(args for args, _ in cases), timeout=30)):
        assert_one_line_error(result, *words)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run_meter("serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}", "--ledger", str(tmp_path / "l.duckdb")), "listen", str(port))


def test_settings_that_would_break_at_run_time_are_refused_at_start() -> None:
    """Accepted before: `--connect-timeout inf` (every request then failed with 502, an
    OverflowError in the loop) and `--ledger-max-pending 1` (half the bound is 0, so a
    spool was never taken back, and shutdown spun for 30 s)."""
    from meter.config import SettingError, load_settings

    for flags in ({"connect_timeout": "inf"}, {"upstream_timeout": "inf"}, {"client_timeout": "nan"}, {"shutdown_grace": "inf"},
                  {"connect_timeout": "1e300"}, {"ledger_max_pending": "1"}):
        with pytest.raises(SettingError):
            load_settings(flags, env={})
    assert load_settings({"connect_timeout": "30", "ledger_max_pending": "2"}, env={}).ledger_max_pending == 2


def test_a_password_in_a_ledger_urls_query_is_redacted() -> None:
    """asyncpg takes `?password=` as well as `user:password@`: it was printed whole in
    the start-up line and in every ledger error."""
    from meter.config import redact_url

    shown = redact_url("postgresql://meter@127.0.0.1:5432/meter?password=s3cret&sslpassword=k3y&sslmode=require")
    assert "s3cret" not in shown and "k3y" not in shown and "sslmode=require" in shown and "password=***" in shown
    assert redact_url("postgresql://meter:s3cret@db/meter") == "postgresql://meter:***@db/meter"


def test_a_bad_upstream_url_is_refused_without_its_password(tmp_path: Path) -> None:
    """A gateway URL may carry user:password@; refused for its scheme, or as unparsable,
    the line quoted it whole, from a flag, a variable or the config file alike."""
    config = tmp_path / "meter.toml"
    config.write_text('upstream = "ftp://gw-user:gw-s3cret@gateway.example"\n')
    cases = (
        ("serve", "--upstream", "ftp://gw-user:gw-s3cret@gateway.example", "--ledger", str(tmp_path / "l.duckdb")),
        ("serve", "--upstream", "http://gw-user:gw-s3cret@", "--ledger", str(tmp_path / "l.duckdb")),
        ("serve", "--upstream", "http://gw-user:gw-s3cret@[::1", "--ledger", str(tmp_path / "l.duckdb")),
        ("serve", "--config", str(config), "--ledger", str(tmp_path / "l.duckdb")),
        ("reconcile", "--upstream", "ftp://gw-user:gw-s3cret@gateway.example"),
        ("reprice", "--upstream", "ftp://gw-user:gw-s3cret@gateway.example"),
        ("serve", "--upstream", "ftp://gw-user:gw-s3cret@gateway.example"),
    )
    results = run_meters(*cases, timeout=30)  # each its own process, side by side: all are refused before a ledger is opened
    for result in results:
        assert_one_line_error(result, "upstream")
        assert "gw-s3cret" not in result.stderr, result.stderr
    assert "ftp://gw-user:***@gateway.example" in results[-1].stderr  # still says what was given


async def test_the_start_up_line_shows_the_upstream_without_its_password(upstream, meter_process, tmp_path: Path) -> None:
    """The INFO line a started meter logs named the upstream whole, user:password@ and all."""
    gateway = upstream.url.replace("http://", "http://gw-user:gw-s3cret@", 1)
    proc = meter_process("--upstream", gateway, "--ledger", str(tmp_path / "l.duckdb"))
    async with aiohttp.ClientSession() as http, http.get(proc.admin_url + "/healthz") as r:
        assert r.status == 200
    proc.stop()
    assert proc.log_path is not None
    log = proc.log_path.read_text()
    assert "meter forwarding" in log and "gw-user:***@" in log, log
    assert "gw-s3cret" not in log, log


def test_precedence_flags_env_file(tmp_path: Path) -> None:
    from meter.config import load_settings

    config = tmp_path / "meter.toml"
    config.write_text('upstream = "http://file.example"\nlisten = "127.0.0.1:1111"\nadmin_listen = "127.0.0.1:2222"\n[keys]\n"abcd0123abcd0123" = "team-a"\n')
    env = {"METER_CONFIG": str(config), "METER_LISTEN": "127.0.0.1:3333"}
    s = load_settings({"admin_listen": None}, env=env)
    assert (s.upstream, s.listen, s.admin_listen, s.keys) == ("http://file.example", "127.0.0.1:3333", "127.0.0.1:2222", {"abcd0123abcd0123": "team-a"})
    s = load_settings({"listen": "127.0.0.1:4444"}, env=env)
    assert s.listen == "127.0.0.1:4444"
    assert load_settings({}, env={}).upstream == "https://api.openai.com"


def test_keys_id_reads_stdin() -> None:
    import hashlib

    result = run_meter("keys", "id", stdin=SECRET_KEY + "\n")
    assert result.returncode == 0
    assert result.stdout.strip() == hashlib.sha256(SECRET_KEY.encode()).hexdigest()[:16]
    assert SECRET_KEY not in result.stdout + result.stderr
    assert_one_line_error(run_meter("keys", "id", stdin=""), "key")


async def _slow_stream(url: str, results: list[bytes]) -> None:
    headers = {"x-fake-deltas": "10", "x-fake-chunk-delay-ms": "200", "Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}"}
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/responses", data=json.dumps({"model": "gpt-4o", "stream": True}), headers=headers
    ) as r:
        results.append(await r.read())


async def test_sigterm_drains_in_flight_and_flushes_then_restart_appends(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.duckdb"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--flush-interval", "1")
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    for _ in range(5):
        await client.responses.create(model="gpt-4o", input="hi")
    results: list[bytes] = []
    streaming = asyncio.create_task(_slow_stream(proc.url, results))
    await asyncio.sleep(0.6)  # the stream is under way
    proc.signal(signal.SIGTERM)
    await streaming
    assert b"response.completed" in results[0]  # the in-flight stream was allowed to finish
    assert await asyncio.get_running_loop().run_in_executor(None, proc.wait) == 0
    rows = ledger_rows(ledger)
    assert len(rows) == 6  # every record flushed before exit
    assert rows[-1]["stream"] is True and rows[-1]["outcome"] == "completed" and rows[-1]["output_tokens"] is not None

    again = meter_process("--upstream", upstream.url, "--ledger", str(ledger))
    await openai.AsyncOpenAI(base_url=again.url + "/v1", api_key=SECRET_KEY, max_retries=0).responses.create(model="gpt-4o", input="after restart")
    again.stop()
    assert len(ledger_rows(ledger)) == 7


async def test_raw_key_never_written_to_ledger_or_logs(upstream, meter_process, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.duckdb"
    proc = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--log-level", "debug")
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    await client.responses.create(model="gpt-4o", input="hi")
    stream = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True)
    _ = [c async for c in stream]
    try:
        await client.responses.create(model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "status:401"})
    except openai.APIStatusError:
        pass
    proc.stop()
    assert len(ledger_rows(ledger)) == 3
    needle = SECRET_KEY.encode()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
            assert SECRET_KEY[:-4].encode() not in path.read_bytes(), path


def test_serve_starts_with_defaults_in_a_fresh_directory(tmp_path: Path) -> None:
    # The README's first command: no flags beyond addresses, embedded ledger in the cwd.
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meter", "serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", admin), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (tmp_path / "meter.duckdb").exists()


async def test_memory_settings_reach_the_proxy_and_the_websocket_relay(upstream, start_meter) -> None:
    """--client-timeout, --max-metered-bytes and --max-buffered-request-bytes are what the running handlers use, not their defaults."""
    running = await start_meter(upstream.url, client_timeout=7.5, max_metered_bytes=12345, max_buffered_request_bytes=54321, max_metered_bytes_total=99999)
    proxy, relay = running.meter.proxy, running.meter.websocket_relay
    assert (proxy.client_timeout, proxy.max_metered_bytes, proxy.max_buffered_request_bytes) == (7.5, 12345, 54321)
    assert proxy.metering_budget.free == 99999
    assert relay.max_metered_bytes == 12345


# --- the addon registry ---------------------------------------------------------------


class _Recorder:
    """An addon implementing every hook, noting each call under its name."""

    def __init__(self, name: str, calls: list[str], fail: str | None = None) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def _note(self, hook: str) -> None:
        self.calls.append(f"{self.name}.{hook}")
        if hook == self.fail:
            raise RuntimeError(f"{self.name} fails in {hook}")

    async def start(self) -> None:
        self._note("start")

    def request(self, flow: object) -> None:
        self._note("request")

    def admit(self, flow: object) -> None:
        self._note("admit")

    def done(self, flow: object, record: object) -> None:
        self._note("done")

    def websocket_opened(self) -> None:
        self._note("websocket_opened")

    def websocket_closed(self) -> None:
        self._note("websocket_closed")

    async def stop(self) -> None:
        self._note("stop")


async def test_registry_calls_hooks_in_order_and_one_failing_observer_stops_no_other() -> None:
    from meter.flow import HOOKS, Addons

    calls: list[str] = []
    first, second = _Recorder("a", calls, fail="request"), _Recorder("b", calls, fail="stop")
    addons = Addons([first, second])
    await addons.start()
    addons.request(None)  # type: ignore[arg-type]
    assert addons.admit(None) is None  # type: ignore[arg-type]
    addons.done(None, None)  # type: ignore[arg-type]
    addons.websocket_opened()
    addons.websocket_closed()
    await addons.stop()
    assert calls == [
        "a.start", "b.start", "a.request", "b.request", "a.admit", "b.admit", "a.done", "b.done",
        "a.websocket_opened", "b.websocket_opened", "a.websocket_closed", "b.websocket_closed",
        "b.stop", "a.stop",  # the reverse of start: the ledger, started last, flushes first
    ]  # fmt: skip
    assert {c.split(".", 1)[1] for c in calls} == set(HOOKS)


async def test_a_failing_start_stops_start_up() -> None:
    from meter.flow import Addons

    calls: list[str] = []
    addons = Addons([_Recorder("a", calls, fail="start"), _Recorder("b", calls)])
    with pytest.raises(RuntimeError, match="a fails in start"):
        await addons.start()
    assert calls == ["a.start"]


def test_a_misspelled_hook_fails_at_start_up() -> None:
    from meter.flow import Addons

    class Misspelled:
        def requset(self, flow: object) -> None: ...

    class Unrelated:  # public methods far from every hook name are the addon's own business
        def render(self) -> bytes:
            return b""

        stats = None

    with pytest.raises(TypeError, match=r"Misspelled\.requset looks like the hook 'request'"):
        Addons([Unrelated(), Misspelled()])


def test_no_addon_holds_another(tmp_path: Path) -> None:
    from meter.config import load_settings
    from meter.metrics import LedgerMetrics, Metrics
    from meter.server import Meter, default_addons
    from meter.tracing import Tracing

    settings = load_settings({"ledger": str(tmp_path / "l.duckdb")}, env={})
    meter = Meter(settings)  # built, not started: nothing is opened
    metrics = Metrics(settings)
    metrics.register(LedgerMetrics(meter.ledger))  # as the server does
    addons = default_addons(meter.pricer, metrics, Tracing(settings, []), meter.ledger, [_Recorder("extra", [])])
    assert addons[-1] is meter.ledger, "the ledger is the last sink"
    ids = {id(a) for a in addons}
    for addon in addons:
        slots = [getattr(addon, name, None) for cls in type(addon).__mro__ for name in getattr(cls, "__slots__", ())]
        held = [*getattr(addon, "__dict__", {}).values(), *slots]
        others = [type(v).__name__ for v in held if id(v) in ids and v is not addon]
        assert not others, f"{type(addon).__name__} holds {others}"


def test_a_request_past_the_grace_period_does_not_hold_shutdown_three_times_as_long(upstream: Any, meter_process: Any, tmp_path: Path) -> None:
    """After meter's own wait of `--shutdown-grace` for in-flight requests, aiohttp's
    runner waited the same again for each handler, then as long once more after
    cancelling it: 6.1 s to exit with a grace of 2 s, past what the deployments allow
    (terminationGracePeriodSeconds is the grace plus a flush margin) before SIGKILL."""
    ledger = tmp_path / "l.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--shutdown-grace", "2")
    body = b'{"model": "gpt-4o", "input": "hi"}'
    stalled = socket.create_connection(("127.0.0.1", meter.port))
    try:
        stalled.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-fake-scenario: stall-before-headers\r\n"
            b"x-fake-stall-s: 60\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        time.sleep(1)  # in flight, waiting on the upstream
        started = time.monotonic()
        meter.signal(signal.SIGTERM)
        assert meter.wait(30) == 0
        took = time.monotonic() - started
    finally:
        stalled.close()
    assert took < 2 + 2.5, f"meter took {took:.1f} s to stop with a 2 s grace"
    [row] = ledger_rows(ledger)  # the request cut short still has its row
    assert row["path"] == "/v1/responses"


def test_a_stream_cut_by_the_shutdown_is_recorded_as_meter_s_not_the_client_s(upstream: Any, meter_process: Any, tmp_path: Path) -> None:
    """SPEC §4: `client_disconnected` is the client's doing.  A stream still running when
    `--shutdown-grace` ends is cut by meter, and recorded as a WebSocket response is then
    (`error`, `meter_proxy_error`, `shutting_down`); a client that hangs up during the
    grace period is still `client_disconnected`."""
    ledger = tmp_path / "l.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--shutdown-grace", "1.5")
    body = b'{"model": "gpt-4o", "input": "hi", "stream": true}'

    def slow_stream(session: str) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", meter.port), timeout=15)
        client.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-fake-deltas: 12\r\n"
            b"x-fake-chunk-delay-ms: 500\r\nMeter-Session: %s\r\nContent-Length: %d\r\n\r\n%s" % (session.encode(), len(body), body)
        )
        assert client.recv(65536).startswith(b"HTTP/1.1 200")  # streaming: about 6 s to go
        return client

    cut, leaving = slow_stream("cut"), slow_stream("leaving")
    try:
        meter.signal(signal.SIGTERM)
        time.sleep(0.5)
        leaving.close()  # the client's own hang-up, within the grace period
        relayed = b""
        while chunk := cut.recv(65536):  # meter closes the stream when the grace ends
            relayed += chunk
        assert meter.wait(30) == 0
    finally:
        cut.close()
    assert b"response.completed" not in relayed  # the client was cut
    rows = {r["session_id"]: r for r in ledger_rows(ledger)}
    assert (rows["cut"]["status_code"], rows["cut"]["outcome"], rows["cut"]["error_type"], rows["cut"]["error_code"]) == (
        200, "error", "meter_proxy_error", "shutting_down",
    )
    assert (rows["leaving"]["outcome"], rows["leaving"]["error_type"], rows["leaving"]["error_code"]) == ("client_disconnected", None, None)
