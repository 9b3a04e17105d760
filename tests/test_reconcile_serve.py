"""`meter serve --reconcile-every`: reconciliation on a schedule, read as `meter_reconcile_*` on /metrics.

End to end: a real Meter with traffic through the `openai` SDK (to tests/fake_upstream.py),
its schedule running the real reconciliation against tests/fake_provider.py (a real HTTP
process), read back by a real scrape of /metrics.  The schedule's own behaviour (first
run soon after start, never two runs at once, a failure one line and a count, stop()
cancelling) is shown with a small blocking run; start-up without the admin key with a
real `meter serve`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meter.config import load_settings
from meter.ledger import DuckDBStore, store_for
from meter.reconcile import ProviderError
from meter.reconcile.schedule import ReconcileSchedule, RunSummary, scheduled_run
from meter.server import Meter

from .conftest import ROOT, UpstreamProcess
from .redirecting import redirect_elsewhere

ADMIN_KEY = "sk-admin-" + "Zq7" * 12  # a made-up admin key: it must show up nowhere


@pytest.fixture(scope="module")
def provider() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess("tests.fake_provider").start()
    yield proc
    proc.stop()


def tell(provider: UpstreamProcess, **state: Any) -> None:
    body = {"admin_key": ADMIN_KEY, "usage": [], "costs": [], "keys": {}, "rate_limit_once": False, **state}
    req = urllib.request.Request(provider.url + "/__fake/state", data=json.dumps(body).encode(), method="PUT")
    urllib.request.urlopen(req).read()


async def scrape(admin_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics as {sample name: {labels: value}}, parsed by Prometheus' own parser."""
    async with aiohttp.ClientSession() as s, s.get(admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def start(tmp_path: Path, upstream_url: str, run: Any, every: str = "1s") -> Meter:
    flags = {
        "upstream": upstream_url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "ledger": str(tmp_path / "ledger.duckdb"), "flush_interval": 0.05, "reconcile_every": every,
    }
    meter = Meter(load_settings(flags, env={}), reconcile_run=run)
    await meter.start()
    return meter


def admin_url(meter: Meter) -> str:
    host, port = meter.admin_address  # type: ignore[misc]
    return f"http://{host}:{port}"


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_runs_show_as_gauges_on_a_real_scrape(tmp_path: Path, upstream: UpstreamProcess) -> None:
    calls: list[float] = []

    def run() -> RunSummary:
        calls.append(time.time())
        return RunSummary({"match": 3, "meter_missing": 1, "differs": 2}, -0.125)

    meter = await start(tmp_path, upstream.url, run)
    try:
        # Traffic through the SDK goes on while the schedule runs beside it.
        client = openai.AsyncOpenAI(base_url=f"http://{meter.proxy_address[0]}:{meter.proxy_address[1]}/v1", api_key="sk-test-" + "a1" * 20, max_retries=0)  # type: ignore[index]
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert meter.reconcile is not None
        await wait_for(lambda: meter.reconcile is not None and meter.reconcile.state.runs >= 1)
        m = await scrape(admin_url(meter))
        groups = m["meter_reconcile_groups"]
        assert groups == {
            (("verdict", "match"),): 3.0, (("verdict", "meter_missing"),): 1.0,
            (("verdict", "provider_missing"),): 0.0, (("verdict", "differs"),): 2.0,
        }
        assert m["meter_reconcile_cost_difference_usd"][()] == -0.125
        assert m["meter_reconcile_success"][()] == 1.0
        assert abs(m["meter_reconcile_last_run_timestamp_seconds"][()] - calls[0]) < 5
        assert m["meter_reconcile_last_success_timestamp_seconds"][()] >= calls[0]
        assert m["meter_reconcile_runs_total"][()] >= 1
        assert m["meter_reconcile_failures_total"][()] == 0
        # The first run came shortly after start, the next an interval later (every 1s).
        await wait_for(lambda: len(calls) >= 2)
        assert 0.5 < calls[1] - calls[0] < 3
    finally:
        await meter.stop()


async def test_off_by_default_no_reconcile_families(tmp_path: Path, upstream: UpstreamProcess) -> None:
    flags = {"upstream": upstream.url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "ledger": str(tmp_path / "l.duckdb")}
    meter = Meter(load_settings(flags, env={}))
    await meter.start()
    try:
        assert meter.reconcile is None
        m = await scrape(admin_url(meter))
        assert not [name for name in m if name.startswith("meter_reconcile_")]
    finally:
        await meter.stop()


async def test_a_failed_run_is_one_line_and_a_count_and_keeps_the_last_figures(
    tmp_path: Path, upstream: UpstreamProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # stop() gives a run under way STOP_WAIT seconds (5) before leaving it; the run here
    # never ends, so only that wait's length would change: a shorter one keeps this test short.
    monkeypatch.setattr("meter.reconcile.schedule.STOP_WAIT", 0.5)
    outcomes = iter([RunSummary({"match": 5}, 0.0), RuntimeError("provider down\nsecond line"), RuntimeError("still down")])
    done = threading.Event()

    def run() -> RunSummary:
        outcome = next(outcomes, None)
        if outcome is None:
            done.set()
            time.sleep(3600)  # blocked: stop() must not wait for it
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, RunSummary)
        return outcome

    caplog.set_level(logging.INFO, logger="meter.reconcile")
    meter = await start(tmp_path, upstream.url, run)
    try:
        await wait_for(done.is_set)
        m = await scrape(admin_url(meter))
        assert m["meter_reconcile_failures_total"][()] == 2
        assert m["meter_reconcile_runs_total"][()] == 3
        assert m["meter_reconcile_success"][()] == 0
        assert m["meter_reconcile_groups"][(("verdict", "match"),)] == 5  # the last good run's figures
        failures = [r.getMessage() for r in caplog.records if r.name == "meter.reconcile" and r.levelno == logging.WARNING]
        assert failures == ["reconcile: run failed: RuntimeError: provider down", "reconcile: run failed: RuntimeError: still down"]
    finally:
        began = time.monotonic()
        await meter.stop()
        assert time.monotonic() - began < 10  # the blocked run's thread is left; the task is cancelled


async def test_runs_never_overlap_and_stop_cancels() -> None:
    active = 0
    most = 0
    starts: list[float] = []
    lock = threading.Lock()

    def run() -> RunSummary:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        starts.append(time.monotonic())
        time.sleep(0.3)  # longer than the interval
        with lock:
            active -= 1
        return RunSummary({"match": 1}, 0.0)

    schedule = ReconcileSchedule(run, every=0.1, first_delay=0.0)
    schedule.start()
    await wait_for(lambda: len(starts) >= 4)
    await schedule.stop()
    assert active == 0  # stop() waited for the run under way (0.3 s) to end: the ledger closes after it
    assert most == 1
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(starts))  # the next run waits for the last to end
    assert schedule._task is None
    count = len(starts)
    await asyncio.sleep(0.5)
    assert len(starts) == count  # none after stop()


def test_serve_without_the_admin_key_is_one_line_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_ADMIN_KEY", "METER_CONFIG")}
    env["METER_RECONCILE_EVERY"] = "1h"
    proc = subprocess.run(
        [sys.executable, "-m", "meter", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--ledger", str(tmp_path / "l.duckdb")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "OPENAI_ADMIN_KEY" in lines[0] and "reconcile-every" in lines[0]
    assert not (tmp_path / "l.duckdb").exists()  # refused before the ledger is opened


def test_a_bad_interval_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meter", "serve", "--reconcile-every", "hourly", "--ledger", str(tmp_path / "l.duckdb")],
        cwd=ROOT, env={**os.environ, "OPENAI_ADMIN_KEY": ADMIN_KEY}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "reconcile_every" in proc.stderr.replace("-", "_"), proc.stderr
    # TOML has nan and inf: nan passed every check and ran reconciliations back to back
    # (the wait after a run, max(0, nan - elapsed), is 0), inf ran once and never again
    for value in ("nan", "inf", "-inf"):
        config = tmp_path / f"{value}.toml"
        config.write_text(f"reconcile_every = {value}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "meter", "serve", "--config", str(config), "--ledger", str(tmp_path / "l.duckdb")],
            cwd=ROOT, env={**os.environ, "OPENAI_ADMIN_KEY": ADMIN_KEY}, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2, (value, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "reconcile_every" in proc.stderr.replace("-", "_"), proc.stderr
    assert not (tmp_path / "l.duckdb").exists()


async def test_books_against_the_fake_provider_end_to_end(
    tmp_path: Path, upstream: UpstreamProcess, provider: UpstreamProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """SDK traffic through meter; the provider first agrees, then saw traffic that bypassed meter,
    then refuses the admin key: each shows on /metrics within a run or two."""
    caplog.set_level(logging.INFO, logger="meter.reconcile")
    tell(provider)
    monkeypatch.setenv("METER_TEST_ADMIN_KEY", ADMIN_KEY)
    flags = {
        "upstream": upstream.url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "ledger": str(tmp_path / "ledger.duckdb"), "flush_interval": 0.05, "reconcile_every": "1s",
    }
    settings = load_settings(flags, env={})
    store = store_for(settings)
    # The same run `meter serve` builds, with the provider's organisation API at the fake's address
    # (meter's upstream, the fake model API, has none).
    run = scheduled_run(provider.url, store, admin_key_env="METER_TEST_ADMIN_KEY")
    meter = Meter(settings, store=store, reconcile_run=run)
    await meter.start()
    schedule = meter.reconcile
    assert schedule is not None
    try:
        client = openai.AsyncOpenAI(base_url=f"http://{meter.proxy_address[0]}:{meter.proxy_address[1]}/v1", api_key="sk-test-" + "b2" * 20, max_retries=0)  # type: ignore[index]
        for text in ("one", "two"):
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
        await asyncio.wait_for(meter.proxy.idle.wait(), 30)  # type: ignore[union-attr]
        assert await asyncio.get_running_loop().run_in_executor(None, meter.ledger.flush)
        _, rows = store.query("SELECT model, input_tokens, cached_tokens, output_tokens, cost_usd, started_at FROM requests", [])
        assert len(rows) == 2
        model = rows[0][0]
        today = rows[0][5].astimezone(dt.UTC).strftime("%Y-%m-%d")  # the UTC day of its started_at
        meter_cost = float(sum(r[4] for r in rows))
        agreed = {
            "day": today, "model": model, "project_id": "proj_1", "api_key_id": "key_1", "service_tier": "default",
            "input_tokens": sum(r[1] for r in rows), "input_cached_tokens": sum(r[2] or 0 for r in rows),
            "output_tokens": sum(r[3] for r in rows), "num_model_requests": 2,
        }
        costs = [{"day": today, "project_id": "proj_1", "line_item": f"{model}, input", "value": meter_cost}]

        async def after_next_runs() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
            target = schedule.state.runs + 2  # the run under way may have read the old state
            await wait_for(lambda: schedule.state.runs >= target)
            return await scrape(admin_url(meter))

        tell(provider, usage=[agreed], costs=costs)
        m = await after_next_runs()
        assert m["meter_reconcile_groups"][(("verdict", "match"),)] == 1
        assert sum(m["meter_reconcile_groups"].values()) == 1
        assert abs(m["meter_reconcile_cost_difference_usd"][()]) < 1e-6
        assert m["meter_reconcile_success"][()] == 1

        # Traffic that bypassed meter: another model the provider served and charged 0.5 USD for.
        bypass = {**agreed, "model": "gpt-4.1-nano", "num_model_requests": 3}
        tell(provider, usage=[agreed, bypass], costs=[*costs, {**costs[0], "line_item": "gpt-4.1-nano, input", "value": 0.5}])
        m = await after_next_runs()
        assert m["meter_reconcile_groups"][(("verdict", "match"),)] == 1
        assert m["meter_reconcile_groups"][(("verdict", "meter_missing"),)] == 1
        assert abs(m["meter_reconcile_cost_difference_usd"][()] + 0.5) < 1e-6

        # The provider refuses the key: a failure per run, one line each, the key nowhere.
        failures_before = m["meter_reconcile_failures_total"][()]
        tell(provider, admin_key="sk-admin-another", usage=[agreed, bypass])
        m = await after_next_runs()
        assert m["meter_reconcile_success"][()] == 0
        assert m["meter_reconcile_failures_total"][()] >= failures_before + 1
        assert m["meter_reconcile_groups"][(("verdict", "meter_missing"),)] == 1  # the last good run's figures
        lines = [r.getMessage() for r in caplog.records if r.name == "meter.reconcile" and r.levelno == logging.WARNING]
        assert lines and all("refused the admin key (HTTP 401)" in line for line in lines), lines
        assert ADMIN_KEY not in caplog.text
        assert ADMIN_KEY not in "\n".join(f"{k}{v}" for k, v in m.items())
    finally:
        await meter.stop()


def test_meter_serve_process_reconciles_on_its_own_and_stops_cleanly(
    tmp_path: Path, provider: UpstreamProcess, meter_process: Any,
) -> None:
    """`meter serve --reconcile-every` as a process, built from its settings alone: the admin key
    from `[reconcile]`'s default variable, the provider at `--upstream`."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    bypass = {
        "day": today, "model": "gpt-4o-mini", "project_id": "proj_1", "api_key_id": "key_1", "service_tier": "default",
        "input_tokens": 10, "input_cached_tokens": 0, "output_tokens": 5, "num_model_requests": 1,
    }
    tell(provider, usage=[bypass], costs=[{"day": today, "project_id": "proj_1", "line_item": "gpt-4o-mini, input", "value": 0.25}])
    proc = meter_process(
        "--upstream", provider.url, "--ledger", str(tmp_path / "l.duckdb"), "--reconcile-every", "1s",
        env={"OPENAI_ADMIN_KEY": ADMIN_KEY, "METER_CONFIG": ""},
    )
    deadline = time.monotonic() + 20
    groups: dict[tuple[tuple[str, str], ...], float] = {}
    while time.monotonic() < deadline:
        m = asyncio.run(scrape(proc.admin_url))
        groups = m.get("meter_reconcile_groups", {})
        if groups:
            break
        time.sleep(0.2)
    assert groups[(("verdict", "meter_missing"),)] == 1  # the provider saw a request meter never did
    assert m["meter_reconcile_cost_difference_usd"][()] == -0.25
    assert m["meter_reconcile_success"][()] == 1
    proc.signal(15)
    assert proc.wait(30) == 0
    log = (tmp_path / "meter0.log").read_text()
    assert "reconcile: 0 match, 1 meter_missing, 0 provider_missing, 0 differs" in log
    assert ADMIN_KEY not in log


def test_a_redirecting_provider_never_gets_the_admin_key_sent_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run `meter serve --reconcile-every` schedules reads the provider as `meter
    reconcile` does: a redirect fails the run, and the admin key goes nowhere else."""
    monkeypatch.setenv("METER_TEST_ADMIN_KEY", ADMIN_KEY)
    store = DuckDBStore(str(tmp_path / "ledger.duckdb"))
    store.open()
    try:
        with redirect_elsewhere(302) as redirect:
            run = scheduled_run(redirect.url, store, admin_key_env="METER_TEST_ADMIN_KEY")
            with pytest.raises(ProviderError, match="answered HTTP 302.*does not follow redirects") as failed:
                run()
    finally:
        store.close()
    assert redirect.reached == [] and ADMIN_KEY not in str(failed.value)
