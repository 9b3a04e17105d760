"""Every dashboard panel's PromQL, evaluated by a real Prometheus that scraped a real meter.

A Prometheus server (the `prometheus` binary; Debian package `prometheus`)
scrapes meter's admin port every second while mixed traffic goes through meter
to the fake provider.  Then each expression of each panel of each dashboard
under `dashboards/`, with its template variables substituted as Grafana would
(all models, all keys), goes through Prometheus's HTTP API: it must parse and
return at least one series.  A panel that shows nothing fails the test.

meter runs with `--metrics-tag-labels team` and some requests carry a `team`
tag, so the "by tag" panels have their label: their `tag` variable is resolved
the way Grafana resolves it (the label names Prometheus holds for its metric,
through its regex), and their series must carry that tag's values.

It also runs with two budgets and a webhook (the receiver process of
tests/webhook_receiver.py, refusing its first POST): one budget that every
request crosses at once, so an alert fails and is then sent, and an enforcing
one for the `team` tag `blocked`, which refuses its second request.  So the
budget panels chart series a real meter exposes.

The same Prometheus loads deploy/prometheus/alerts.yml: on these series the
rules for exhausted budgets and unpriced models must fire, and no other.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from .conftest import ROOT, SECRET_KEY, UpstreamProcess, free_port
from .dashboard_queries import all_values, label_names_match, load_dashboards, panel_queries, pick_label_name, substitute, variables
from .test_metrics import U3, drive_mixed_traffic, fake_usage, scrape, sdk

DASHBOARDS = ROOT / "dashboards"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval is at least 4 scrape intervals; 30 s holds every point of the run
TIME_RANGE = "5m"


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path, rule_files: tuple[Path, ...] = ()) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            + (f"rule_files: {json.dumps([str(path) for path in rule_files])}\n" if rule_files else "")
            + "scrape_configs:\n"
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

    async def label_names(self, session: aiohttp.ClientSession, match: str) -> list[str]:
        async with session.get(self.url + "/api/v1/labels", params={"match[]": match}) as r:
            answer = await r.json()
        assert answer.get("status") == "success", answer
        return list(answer["data"])

    async def firing(self, session: aiohttp.ClientSession) -> set[tuple[str, str]]:
        """(alert name, its distinguishing label: budget, model or instance) of every firing alert."""
        async with session.get(self.url + "/api/v1/alerts") as r:
            answer = await r.json()
        assert answer.get("status") == "success", answer
        out = set()
        for alert in answer["data"]["alerts"]:
            if alert["state"] == "firing":
                labels = alert["labels"]
                out.add((labels["alertname"], labels.get("budget") or labels.get("model") or labels.get("instance", "")))
        return out

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
        prom = Prometheus(prometheus_binary(), target, tmp_path, rule_files=(ALERT_RULES,))
        started.append(prom)
        await prom.start()
        return prom

    yield start
    for prom in started:
        prom.stop()


TAGS = ("search", "support")
# Every priced request crosses this one's alert threshold; the second request tagged `blocked` is refused.
BUDGETS = [
    {"name": "all-traffic", "window": "month", "limit_usd": "0.000001", "mode": "observe", "alert_at": [0.5]},
    {"name": "blocked-team", "match": {"tag:team": "blocked"}, "window": "day", "limit_usd": "0.000001", "mode": "enforce"},
]


@pytest.fixture
def webhook() -> Any:
    proc = UpstreamProcess("tests.webhook_receiver", args=["--fail", "1"]).start()
    yield proc
    proc.stop()


async def send_tagged(meter_url: str) -> int:
    """Priced requests with a `team` tag (one each), besides the mixed traffic's untagged ones;
    then two for the enforcing budget, the second refused.  Returns how many were sent."""
    client = sdk(meter_url)
    for team in TAGS:
        await client.responses.create(model="gpt-4o", input="hi", metadata={"team": team}, extra_headers=fake_usage(**U3))
    await client.responses.create(model="gpt-4o", input="hi", metadata={"team": "blocked"}, extra_headers=fake_usage(**U3))
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="gpt-4o", input="hi", metadata={"team": "blocked"}, extra_headers=fake_usage(**U3))
    await client.close()
    return len(TAGS) + 2


async def send_disconnected(meter_url: str) -> int:
    """A stream the client leaves after its first bytes: outcome `client_disconnected`, not an error."""
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "x-fake-deltas": "50", "x-fake-chunk-delay-ms": "20"}
    async with aiohttp.ClientSession() as s, s.post(meter_url + "/v1/responses", json={"model": "gpt-4o", "input": "hi", "stream": True}, headers=headers) as r:
        assert r.status == 200
        await r.content.readany()  # leaving unread closes the connection
    return 1


def alert_error_ratio() -> str:
    """The ratio MeterHighErrorRatio compares with its threshold."""
    [rule] = [r for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in group["rules"] if r.get("alert") == "MeterHighErrorRatio"]
    expr = rule["expr"]
    return expr[: expr.index(") >") + 1]


def over_totals(promql: str) -> str:
    """`promql` with each `rate(counter[window])` read as the counter itself: the same ratio over all time."""
    return re.sub(r"\brate\(([^\[\]]*)\[[^\]]*\]\)", r"\1", promql)


async def test_every_dashboard_panel_returns_data(upstream, webhook, start_meter, prometheus_for) -> None:
    boards = load_dashboards(DASHBOARDS)
    assert any(panel_queries(board) for board in boards), f"no panel queries found under {DASHBOARDS}"

    meter = await start_meter(
        upstream.url, price_provider="openai", metrics_tag_labels="team", budgets=BUDGETS, alerts={"webhooks": [webhook.url + "/hook"]},
    )
    host, port = meter.meter.admin_address
    prom = await prometheus_for(f"{host}:{port}")
    sent = await drive_mixed_traffic(meter.url)
    tagged = await send_tagged(meter.url) + await send_disconnected(meter.url)
    await meter.flush()
    local = await scrape(meter.admin_url)
    assert local.value("meter_requests_total") == sent.total + tagged
    assert local.value("meter_requests_total", outcome="client_disconnected") == 1
    assert local.value("meter_budget_rejections_total", budget="blocked-team") == 1

    async with aiohttp.ClientSession() as s:
        # Wait until Prometheus holds the final counts, then a few more scrapes so
        # that rate() over the window has several points of every series.
        deadline = time.monotonic() + 20
        while await prom.value(s, "sum(meter_requests_total)") != sent.total + tagged:
            assert time.monotonic() < deadline, "Prometheus never scraped the final counts:\n" + prom.log.read_text()[-2000:]
            await asyncio.sleep(0.25)
        # The budget alert: refused once by the webhook, then sent on the retry (after a second).
        while (await prom.value(s, "sum(meter_alerts_sent_total)") or 0) < 1 or not await prom.value(s, "sum(meter_alert_failures_total)"):
            assert time.monotonic() < deadline + 10, "the budget alert was never failed and then sent:\n" + (await scrape(meter.admin_url)).text[-3000:]
            await asyncio.sleep(0.25)
        await asyncio.sleep(3)
        up = await prom.value(s, 'up{job="meter"}')
        assert up == 1.0

        queries = []
        label_vars: dict[str, str] = {}  # variable -> the label name it resolved to
        for board in boards:
            values = all_values(board)  # every variable at "All", as a fresh dashboard opens
            for var in variables(board):
                match = label_names_match(var)
                if match is not None:
                    chosen = pick_label_name(var, await prom.label_names(s, match))
                    assert chosen, f"variable {var['name']} finds no label among {await prom.label_names(s, match)}"
                    values[var["name"]] = label_vars[var["name"]] = chosen
            for title, expr in panel_queries(board):
                promql = substitute(expr, values, rate_interval=RATE_INTERVAL, time_range=TIME_RANGE)
                uses = {name for name in label_vars if f"${name}" in expr or f"${{{name}}}" in expr}
                queries.append((board.get("title", "?"), title, promql, uses))
        assert label_vars == {"tag": "tag_team"}, label_vars

        failures: list[str] = []
        for dash_title, title, promql, uses in queries:
            answer = await prom.query(s, promql)
            if answer.get("status") != "success":
                failures.append(f"[{dash_title}] {title!r}: {answer.get('errorType')}: {answer.get('error')}\n    {promql}")
            elif not answer["data"]["result"]:
                failures.append(f"[{dash_title}] {title!r}: no series\n    {promql}")
            else:
                for name in uses:  # a "by tag" panel: its series are the tag's values
                    got = {series["metric"].get(label_vars[name], "") for series in answer["data"]["result"]}
                    if not set(TAGS) <= got:
                        failures.append(f"[{dash_title}] {title!r}: {label_vars[name]} values {sorted(got)}, expected {TAGS}\n    {promql}")
        assert not failures, f"{len(failures)} of {len(queries)} panel queries failed:\n" + "\n".join(failures)

        # The error ratio a dashboard shows is the one the alert rule watches (its description
        # sends the reader to it): neither a client that left nor a budget's refusal is an error.
        # Both over the counters' totals (each series' rate is 0 here: it appeared at its final count).
        [(_, _, ratio_promql, _)] = [q for q in queries if q[1] == "Error ratio"]
        shown, watched = await prom.value(s, over_totals(ratio_promql)), await prom.value(s, over_totals(alert_error_ratio()))
        errors = sum(local.value("meter_requests_total", outcome=o) for o in ("error", "failed", "upstream_unreachable", "upstream_timeout"))
        expected = errors / (local.value("meter_requests_total") - local.value("meter_requests_total", outcome="rejected"))
        assert watched == pytest.approx(expected, abs=1e-12) and 0 < expected < 1
        assert shown == pytest.approx(expected, abs=1e-12), (shown, expected)

        # deploy's alerting rules, evaluated by this Prometheus on the same series: the budgets
        # past their limits and the unpriced model fire (no `for`); nothing about the ledger does.
        expected = {
            ("MeterBudgetExhausted", "all-traffic"),
            ("MeterBudgetExhausted", "blocked-team"),
            ("MeterUnpricedRequests", "acme-unpriced-model"),
            ("MeterUnpricedRequests", "gpt-4o-2024-08-06"),  # the usage anomaly is left unpriced too
        }
        while (firing := await prom.firing(s)) != expected:
            assert time.monotonic() < deadline + 20, f"firing alerts {sorted(firing)}, expected {sorted(expected)}"
            await asyncio.sleep(0.25)
