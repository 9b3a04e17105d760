"""The web console on the admin port (SPEC §12), in a real browser.

A real `meter serve` (with an admin token, key names and a budget) forwards
traffic from the official `openai` SDK to the fake upstream; Debian's chromium,
headless (tests/browser.py), signs in with the token (a wrong one first) and
reads the page as a person would: the key names, models, request counts and
costs of the table equal `meter report --format json`'s, a model filter
changes them to that filtered report's, the latest requests are listed, and
nothing in the browser's console or network panel failed.  The screenshot is
kept in tests/artifacts/console.png.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from meter.identity import key_id
from tests.browser import Browser
from tests.conftest import ROOT

TOKEN = "console-test-token-7f3a"
KEYS = {"sk-console-search-0001": "team-search", "sk-console-mobile-0002": "team-mobile"}
ARTIFACT = ROOT / "tests" / "artifacts" / "console.png"

# A model name is the client's to choose: the page must show it as text, never run it.
HOSTILE_MODEL = "<img src=/x onerror=window.pwned=1>unpriced"

# (api key, model, input, cached, output, reasoning, tag team) per request
TRAFFIC = [
    ("sk-console-search-0001", "gpt-4o-mini", 1200, 400, 300, 0, "search"),
    ("sk-console-search-0001", "gpt-4o-mini", 800, 0, 150, 0, "search"),
    ("sk-console-search-0001", "gpt-4.1", 3000, 1000, 500, 0, "search"),
    ("sk-console-mobile-0002", "o4-mini", 2000, 0, 900, 600, "mobile"),
    ("sk-console-mobile-0002", "gpt-4o-mini", 500, 100, 80, 0, "mobile"),
    ("sk-console-mobile-0002", HOSTILE_MODEL, 700, 0, 60, 0, "mobile"),
]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("METER_")}


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "meter.toml"
    keys = "\n".join(f'"{key_id(k)}" = "{name}"' for k, name in KEYS.items())
    cfg.write_text(f'[keys]\n{keys}\n\n[[budgets]]\nname = "search-daily"\nmatch = {{ key = "team-search" }}\nwindow = "day"\nlimit_usd = 0.0125\n')
    return cfg


async def _traffic(url: str) -> None:
    clients = {k: openai.AsyncOpenAI(base_url=url + "/v1", api_key=k, max_retries=0) for k in KEYS}
    for key, model, inp, cached, out, reasoning, team in TRAFFIC:
        usage = {"input_tokens": inp, "cached_tokens": cached, "output_tokens": out, "reasoning_tokens": reasoning}
        resp = await clients[key].responses.create(
            model=model, input="hello", extra_headers={"x-fake-usage": json.dumps(usage), "Meter-Tag-Team": team}
        )
        assert resp.usage is not None and resp.usage.input_tokens == inp
    # An embedding of a few tokens costs under a millionth of a dollar: the console shows
    # the report's digits for it, never 0.000000.
    embedding = await clients["sk-console-search-0001"].embeddings.create(
        model="text-embedding-3-small", input="hi", extra_headers={"x-fake-usage": json.dumps({"input_tokens": 5})}
    )
    assert embedding.usage.prompt_tokens == 5
    with pytest.raises(openai.InternalServerError):  # one failed request: the errors column
        await clients["sk-console-mobile-0002"].responses.create(model="gpt-4o-mini", input="x", extra_headers={"x-fake-scenario": "status:500"})
    for client in clients.values():
        await client.close()


async def _report(admin_url: str, *args: str) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meter", "report", "--url", admin_url, "--format", "json", *args,
        cwd=ROOT, env={**_env(), "METER_ADMIN_TOKEN": TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    rows: list[dict[str, Any]] = json.loads(out, parse_float=Decimal)
    return rows


# What a person reads in the "By key and model" table: key (without its hint), model,
# requests, cost (as `meter report`'s table shows it), errors.
TABLE_JS = """[...document.querySelectorAll('#by-key-model tbody tr')].filter(tr => tr.cells.length > 1).map(tr => ({
  key: tr.cells[0].dataset.key, model: tr.cells[1].dataset.model, requests: tr.cells[2].textContent,
  cost: tr.cells[7].textContent, errors: tr.cells[9].textContent}))"""


def _shown_cost(cost: Decimal) -> str:
    """A cost as `meter report`'s table writes it: every digit to the ninth decimal, trailing
    zeros dropped down to two decimals."""
    whole, _, frac = f"{cost:.9f}".rstrip("0").partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _expected(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "key": row["key"] or "",
            "model": row["model"] or "",
            "requests": f"{row['requests']:,}",
            "cost": "" if row["cost_usd"] is None else _shown_cost(row["cost_usd"]),
            "errors": f"{row['errors']:,}",
        }
        for row in rows
    ]


async def _loads(browser: Browser) -> int:
    return int(await browser.evaluate("Number(document.body.dataset.loaded || 0)"))


async def test_console_in_chromium(upstream: Any, meter_process: Any, tmp_path: Path) -> None:
    ledger = tmp_path / "meter.duckdb"
    meter = meter_process(
        "--upstream", upstream.url, "--ledger", str(ledger), "--config", str(_config(tmp_path)), "--admin-token", TOKEN, env=_env()
    )
    await _traffic(meter.url)
    by_key_model = await _report(meter.admin_url, "--by", "key,model")
    assert {r["key"] for r in by_key_model} == {"team-search", "team-mobile"}
    assert sum(r["requests"] for r in by_key_model) == len(TRAFFIC) + 2
    tiny = [r["cost_usd"] for r in by_key_model if r["model"] == "text-embedding-3-small"]
    assert len(tiny) == 1 and Decimal(0) < tiny[0] < Decimal("0.0000005"), tiny

    async with Browser() as browser:
        await browser.goto(meter.admin_url + "/")
        # Signed out: the form, and no data asked for.
        await browser.wait_for("!document.getElementById('signin').hidden")
        assert await browser.evaluate("document.getElementById('console').hidden") is True
        assert browser.problems == []
        # A wrong token says so (its 401 is the only failed request allowed, and only here).
        await browser.evaluate("document.getElementById('token').value = 'not-the-token'; document.querySelector('#signin-form button').click()")
        assert "Wrong token" in await browser.wait_for("document.getElementById('signin-error').textContent")
        assert browser.problems and all("401" in p for p in browser.problems), browser.problems
        browser.problems.clear()

        await browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}; document.querySelector('#signin-form button').click()")
        await browser.wait_for("Number(document.body.dataset.loaded || 0) >= 1")
        assert await browser.evaluate("document.getElementById('error').hidden") is True
        assert await browser.evaluate(TABLE_JS) == _expected(by_key_model)
        total_requests = sum(r["requests"] for r in by_key_model)
        assert await browser.evaluate("document.getElementById('total-requests').textContent") == str(total_requests)
        total_cost = sum((r["cost_usd"] for r in by_key_model if r["cost_usd"] is not None), Decimal(0))
        assert await browser.evaluate("document.querySelector('#by-key-model tfoot td:nth-child(8)').textContent") == _shown_cost(total_cost)
        assert await browser.evaluate("document.getElementById('total-errors').textContent") == "1"
        # The unpriced model: no cost shown (never 0), counted as unpriced.
        unpriced = [r for r in by_key_model if r["model"] == HOSTILE_MODEL]
        assert unpriced and unpriced[0]["cost_usd"] is None and unpriced[0]["unpriced_requests"] == 1
        # ... and shown as the text it is, in the table and the latest requests.
        assert await browser.evaluate("window.pwned === undefined && document.querySelectorAll('main img').length === 0") is True
        assert HOSTILE_MODEL in await browser.evaluate("document.getElementById('by-key-model').textContent")
        # The latest requests: every one (fewer than the page's 50), newest first.
        latest = await browser.evaluate("[...document.querySelectorAll('#latest tbody tr')].map(tr => [tr.cells[1].dataset.key, tr.cells[2].textContent])")
        assert len(latest) == total_requests
        assert latest[0] == ["team-mobile", "gpt-4o-mini"]  # the failed request came last
        # The budget against its limit, and the chart's bars.
        # Its spend and limit with the report's digits: a limit of $0.0125 is not "$0.01".
        budgets = await browser.evaluate("document.getElementById('budgets').textContent")
        assert "search-daily" in budgets and "of $0.0125 (" in budgets, budgets
        assert await browser.evaluate("document.querySelectorAll('#chart svg rect').length") >= 2
        legend = await browser.evaluate("[...document.querySelectorAll('#chart .legend text')].map(t => t.textContent)")
        assert set(legend) == {"team-search", "team-mobile"}

        # A filter: one model; the table becomes that filtered report.
        loads = await _loads(browser)
        await browser.evaluate("document.getElementById('f-model').value = 'gpt-4o-mini'; document.querySelector('#filters button').click()")
        await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}")
        filtered = await _report(meter.admin_url, "--by", "key,model", "--where", "model=gpt-4o-mini")
        assert {r["model"] for r in filtered} == {"gpt-4o-mini"}
        shown = await browser.evaluate(TABLE_JS)
        assert shown == _expected(filtered) and shown != _expected(by_key_model)
        models = await browser.evaluate("[...document.querySelectorAll('#latest tbody tr')].map(tr => tr.cells[2].textContent)")
        assert set(models) == {"gpt-4o-mini"} and len(models) == sum(r["requests"] for r in filtered)

        # A tag filter and a split by tag.
        loads = await _loads(browser)
        await browser.evaluate(
            "document.getElementById('f-model').value = ''; document.getElementById('f-tag').value = 'team=search';"
            "document.getElementById('split').value = 'Model'; document.querySelector('#filters button').click()"
        )
        await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}")
        tagged = await _report(meter.admin_url, "--by", "key,model", "--where", "tag:team=search")
        assert await browser.evaluate(TABLE_JS) == _expected(tagged)
        assert {r["key"] for r in tagged} == {"team-search"}
        # The split typed in capitals is the report's field all the same: one series per model.
        legend = await browser.evaluate("[...document.querySelectorAll('#chart .legend text')].map(t => t.textContent)")
        assert set(legend) == {r["model"] for r in tagged}, legend

        # The last 24 hours, per hour: the report's over that window, the chart's bars by hour.
        loads = await _loads(browser)
        await browser.evaluate("document.getElementById('f-tag').value = ''; const r = document.getElementById('range'); r.value = '24h'; r.dispatchEvent(new Event('change'))")
        await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}")
        day = await _report(meter.admin_url, "--by", "key,model", "--since", "24h")
        assert await browser.evaluate(TABLE_JS) == _expected(day) == _expected(by_key_model)
        assert (await browser.evaluate("document.getElementById('chart-title').textContent")).startswith("Cost per hour by model")

        # Dates replace the range: from and to today (UTC) is everything; to yesterday, nothing.
        today = dt.datetime.now(dt.UTC).date()
        for since, until, expect in ((today, today, day), (today - dt.timedelta(days=3), today - dt.timedelta(days=1), [])):
            loads = await _loads(browser)
            await browser.evaluate(
                f"document.getElementById('f-since').value = '{since}'; document.getElementById('f-until').value = '{until}';"
                "document.querySelector('#filters button').click()"
            )
            await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}")
            assert await _report(meter.admin_url, "--by", "key,model", "--since", str(since), "--until", str(until)) == expect
            assert await browser.evaluate(TABLE_JS) == _expected(expect)
        assert await browser.evaluate("document.getElementById('total-requests').textContent") == "0"
        await browser.evaluate("document.getElementById('f-since').value = ''; document.getElementById('f-until').value = ''")

        # Back to everything for the picture a person would see first.
        loads = await _loads(browser)
        await browser.evaluate("document.getElementById('f-tag').value = ''; document.getElementById('split').value = 'key'; document.querySelector('#filters button').click()")
        await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}")
        path = await browser.screenshot(ARTIFACT)
        print(f"console screenshot: {path}")
        assert path.stat().st_size > 10_000
        assert browser.problems == []


async def test_page_loads_without_the_token_and_data_does_not(meter_process: Any, upstream: Any, tmp_path: Path) -> None:
    """The page and its files carry no data and load without the token; every data path
    (the latest requests included) needs it; without a token set, the page says so."""
    guarded = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "a.duckdb"), "--admin-token", TOKEN, env=_env())
    open_ = meter_process("--upstream", upstream.url, "--ledger", str(tmp_path / "b.duckdb"), env=_env())
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/console/app.js", "/console/chart.js", "/console/style.css"):
            async with s.get(guarded.admin_url + path) as r:
                assert r.status == 200, path
                body = await r.text()
                assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")  # nothing from elsewhere
        async with s.get(guarded.admin_url + "/") as r:
            assert 'data-auth="token"' in await r.text()
        async with s.get(open_.admin_url + "/") as r:
            assert 'data-auth="open"' in await r.text()
        for path in ("/api/requests", "/api/report", "/api/budgets", "/console/../api/requests", "/console/secret.js"):
            async with s.get(guarded.admin_url + path) as r:
                assert r.status in (401, 404) and TOKEN not in await r.text(), path
        async with s.get(guarded.admin_url + "/api/requests") as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with s.get(guarded.admin_url + "/api/requests", headers=headers) as r:
            assert r.status == 200 and await r.json() == []
        async with s.get(guarded.admin_url + "/api/requests?limit=0", headers=headers) as r:
            assert r.status == 400 and "limit" in (await r.json())["error"]
        async with s.get(guarded.admin_url + "/api/requests?where=colour=red", headers=headers) as r:
            assert r.status == 400 and "colour" in (await r.json())["error"]


async def test_console_says_when_records_are_not_in_the_ledger(upstream: Any, postgres: Any, meter_process: Any, tmp_path: Path) -> None:
    """A report that cannot see every record says so (SPEC: `Meter-Report-Pending`; the
    CLI warns on stderr).  The console drew the partial figures as if they were all:
    with inserts held up, a page showing 2 requests when 5 were served said nothing."""
    import asyncpg

    url = postgres.new_database()
    meter = meter_process("--upstream", upstream.url, "--ledger", url, "--spool", str(tmp_path / "spool.jsonl"), "--flush-interval", "0.1", env=_env())
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key="sk-console-search-0001", max_retries=0)
    usage = {"x-fake-usage": json.dumps({"input_tokens": 10, "output_tokens": 2})}
    for _ in range(2):
        await client.responses.create(model="gpt-4o-mini", input="hi", extra_headers=usage)
    async with Browser() as browser:
        await browser.goto(meter.admin_url + "/")
        await browser.wait_for("Number(document.body.dataset.loaded || 0) >= 1")
        assert await browser.evaluate("document.getElementById('total-requests').textContent") == "2"
        assert await browser.evaluate("document.getElementById('pending').hidden") is True
        # Hold the table: reads go on (EXCLUSIVE admits ACCESS SHARE), inserts wait.
        holder = await asyncpg.connect(url)
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute("LOCK TABLE requests IN EXCLUSIVE MODE")
            for _ in range(3):
                await client.responses.create(model="gpt-4o-mini", input="hi", extra_headers=usage)
            loads = await _loads(browser)
            await browser.evaluate("document.querySelector('#filters button').click()")
            await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}", timeout=30)
            assert await browser.evaluate("document.getElementById('total-requests').textContent") == "2"
            assert await browser.evaluate("document.getElementById('pending').hidden") is False
            warning = await browser.evaluate("document.getElementById('pending').textContent")
            assert "3 requests" in warning and "not in these figures" in warning, warning
        finally:
            await tx.rollback()
            await holder.close()
        # Written: the whole figure, and the warning gone.
        loads = await _loads(browser)
        await browser.evaluate("document.querySelector('#filters button').click()")
        await browser.wait_for(f"Number(document.body.dataset.loaded || 0) > {loads}", timeout=30)
        assert await browser.evaluate("document.getElementById('total-requests').textContent") == "5"
        assert await browser.evaluate("document.getElementById('pending').hidden") is True
        assert browser.problems == []
    await client.close()


def test_console_files_ship_in_the_package() -> None:
    """A non-editable `pip install .` serves the same page: pyproject's package-data
    covers every file the console serves."""
    import tomllib

    from meter.console.api import STATIC_FILES

    static = ROOT / "meter" / "console" / "static"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["meter.console"]
    shipped = {p.name for g in globs for p in (ROOT / "meter" / "console").glob(g)}
    assert {"index.html", *STATIC_FILES} <= shipped
    assert {p.name for p in static.iterdir()} <= shipped


EDGE_TIMES = ["1969-12-31 23:30:00+00", "0001-01-01 05:10:00+00", "2026-11-30 15:59:59.999999+00", "9999-12-31 23:59:59+00"]
EDGE_BUCKETS = [
    ("0001-01-01", "0001-01-01T05:00:00Z"),
    ("1969-12-31", "1969-12-31T23:00:00Z"),
    ("2026-11-30", "2026-11-30T15:00:00Z"),
    ("9999-12-31", "9999-12-31T23:00:00Z"),
]


def _buckets(store: Any) -> list[tuple[str, str]]:
    from meter.report.query import report
    from meter.report.window import parse_args

    store.open()
    try:
        return [(r["day"], r["hour"]) for r in report(store, parse_args("day,hour", None, None))]
    finally:
        store.close()


def test_report_days_and_hours_are_utc_before_1970_and_at_the_ends_duckdb(tmp_path: Path) -> None:
    """The console's time buckets (the report's `day`, `hour`, grouped on a number):
    a row before 1970 is in the day and hour it started in, on both ends of time."""
    import duckdb

    from meter.ledger import DuckDBStore

    path = tmp_path / "edges.duckdb"
    store = DuckDBStore(str(path))
    store.open()
    store.close()
    con = duckdb.connect(str(path))
    for t in EDGE_TIMES:
        con.execute("INSERT INTO requests (id, started_at) VALUES (uuid(), CAST($1 AS TIMESTAMPTZ))", [t])
    con.close()
    assert _buckets(DuckDBStore(str(path))) == EDGE_BUCKETS


def test_report_days_and_hours_are_utc_before_1970_and_at_the_ends_postgresql(pg_url: str) -> None:
    from meter.ledger import PostgresStore
    from tests.pg import execute

    store = PostgresStore(pg_url)
    store.open()
    store.close()
    execute(pg_url, "INSERT INTO requests (id, started_at) VALUES (gen_random_uuid(), $1::text::timestamptz)", [(t,) for t in EDGE_TIMES])
    assert _buckets(PostgresStore(pg_url)) == EDGE_BUCKETS
