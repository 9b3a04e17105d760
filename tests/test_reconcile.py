"""`meter reconcile` against a fake of OpenAI's organisation APIs (tests/fake_provider.py,
a real HTTP server process) and real ledgers: DuckDB files and one PostgreSQL database.

Each test seeds a ledger with meter's own writer, tells the fake provider what it
saw, runs `python -m meter reconcile` as a user would and reads its JSON, its
exit status and the requests the fake received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meter.ledger import DuckDBStore, PostgresStore
from meter.record import Record

from .conftest import ROOT, MeterProcess, UpstreamProcess
from .pg import pg_url, postgres  # noqa: F401
from .redirecting import redirect_elsewhere, run_meter_env
from .socket_server import SocketServer

ADMIN = "sk-admin-test-Zq81"
KEY_A = "sk-proj-aaaaaaaaaaaaaaaaaaaaAAA1"
KEY_B = "sk-proj-bbbbbbbbbbbbbbbbbbbbBBB2"
D1 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
D2 = D1 + dt.timedelta(days=1)
PROJECT = "proj_abc"
LISTING = {
    PROJECT: [
        {"id": "key_a", "name": "a", "redacted_value": "sk-proj-aa****AAA1"},
        {"id": "key_b", "name": "b", "redacted_value": "sk-proj-bb****BBB2"},
    ]
}


@pytest.fixture(scope="module")
def provider() -> Iterator[UpstreamProcess]:
    proc = UpstreamProcess("tests.fake_provider").start()
    yield proc
    proc.stop()


def tell(provider: UpstreamProcess, **state: Any) -> None:
    body = {
        "admin_key": ADMIN,
        "usage": [],
        "costs": [],
        "keys": LISTING,
        "page_days": 31,
        "page_items": 100,
        "rate_limit_once": False,
        "answers": {},
        **state,
    }
    req = urllib.request.Request(provider.url + "/__fake/state", data=json.dumps(body).encode(), method="PUT")
    urllib.request.urlopen(req).read()


def seen(provider: UpstreamProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(provider.url + "/__fake/requests") as r:
        return json.loads(r.read())


def record(
    at: dt.datetime,
    key: str = KEY_A,
    model: str = "gpt-4o-mini",
    tier: str = "default",
    inp: int = 100,
    cached: int = 20,
    out: int = 50,
    cost: str = "0.001",
) -> Record:
    return Record(
        id=str(uuid.uuid4()), started_at=at.timestamp(), finished_at=at.timestamp() + 1, method="POST", path="/v1/responses", endpoint="responses",
        status_code=200, model=model, service_tier=tier, input_tokens=inp, cached_tokens=cached, output_tokens=out, total_tokens=inp + out,
        cost_usd=Decimal(cost), priced=True, key_id=key[-16:], key_hint="sk-..." + key[-4:], project=PROJECT,
    )  # fmt: skip


def not_model_requests() -> list[Record]:
    """Rows the provider's completions usage does not count: a model list, a refused call."""
    at = (D1 + dt.timedelta(hours=4)).timestamp()
    common = {"started_at": at, "finished_at": at + 1, "key_id": KEY_A[-16:], "key_hint": "sk-..." + KEY_A[-4:], "project": PROJECT}
    return [
        Record(id=str(uuid.uuid4()), method="GET", path="/v1/models", endpoint="other", status_code=200, **common),
        Record(id=str(uuid.uuid4()), method="POST", path="/v1/responses", endpoint="responses", status_code=400, outcome="error",
               model_requested="gpt-4o-mini", error_type="invalid_request_error", **common),
    ]  # fmt: skip


def usage(
    day: dt.datetime,
    n: int = 1,
    key: str = "key_a",
    model: str = "gpt-4o-mini",
    tier: str = "default",
    inp: int = 100,
    cached: int = 20,
    out: int = 50,
) -> dict[str, Any]:
    return {"day": day.strftime("%Y-%m-%d"), "model": model, "project_id": PROJECT, "api_key_id": key, "service_tier": tier,
            "input_tokens": inp * n, "input_cached_tokens": cached * n, "output_tokens": out * n, "num_model_requests": n}  # fmt: skip


def cost(day: dt.datetime, value: float) -> dict[str, Any]:
    return {"day": day.strftime("%Y-%m-%d"), "project_id": PROJECT, "line_item": "gpt-4o-mini, input", "value": value}


def seed(path: Path, records: list[Record]) -> str:
    store = DuckDBStore(str(path))
    store.open()
    try:
        store.write(records)
    finally:
        store.close()
    return str(path)


def reconcile(
    provider: UpstreamProcess, ledger: str, *args: str, key: str | None = ADMIN, fmt: str = "json", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_ADMIN_KEY", "METER_CONFIG", "METER_UPSTREAM")}
    if key is not None:
        env["OPENAI_ADMIN_KEY"] = key
    source = ["--url", ledger] if ledger.startswith("http://") else ["--ledger", ledger]
    cmd = [
        sys.executable,
        "-m",
        "meter",
        "reconcile",
        *source,
        "--upstream",
        provider.url,
        "--since",
        "2026-03-01",
        "--until",
        "2026-03-02",
        "--format",
        fmt,
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def groups(result: subprocess.CompletedProcess[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    body = json.loads(result.stdout)
    by = (
        [k for k in body["groups"][0] if k != "verdict" and not k.startswith(("meter_", "provider_", "diff_", "differing"))]
        if body["groups"]
        else []
    )
    return {tuple(g[f] for f in by): g for g in body["groups"]}


def test_exact_match_exit_0(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(
        tmp_path / "m.duckdb",
        [
            record(D1 + dt.timedelta(hours=3)),
            record(D1 + dt.timedelta(hours=9)),
            record(D2 + dt.timedelta(hours=1), model="gpt-4o"),
            *not_model_requests(),
        ],
    )
    tell(provider, usage=[usage(D1, 2), usage(D2, 1, model="gpt-4o")], costs=[cost(D1, 0.002), cost(D2, 0.001)])
    result = reconcile(provider, ledger, "--by", "day,model")
    assert result.returncode == 0, result
    found = groups(result)
    assert set(found) == {("2026-03-01", "gpt-4o-mini"), ("2026-03-02", "gpt-4o")}
    row = found[("2026-03-01", "gpt-4o-mini")]
    assert (row["verdict"], row["meter_requests"], row["provider_requests"], row["meter_cached_tokens"], row["diff_output_tokens"]) == (
        "match",
        2,
        2,
        40,
        0,
    )
    by_day = reconcile(provider, ledger, "--by", "day")
    assert by_day.returncode == 0, by_day
    assert groups(by_day)[("2026-03-01",)]["provider_cost_usd"] == "0.002000000"
    table = reconcile(provider, ledger, "--by", "day,model", fmt="table")
    assert table.returncode == 0 and "2/2" in table.stdout and "2 match" in table.stdout, table.stdout
    assert ADMIN not in table.stdout + table.stderr


def test_traffic_that_bypassed_meter_exit_1(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [record(D1 + dt.timedelta(hours=3))])
    tell(provider, usage=[usage(D1, 3), usage(D1, 5, model="gpt-4.1")])
    result = reconcile(provider, ledger, "--by", "day,model")
    assert result.returncode == 1, result
    found = groups(result)
    assert found[("2026-03-01", "gpt-4.1")]["verdict"] == "meter_missing"
    mini = found[("2026-03-01", "gpt-4o-mini")]
    assert (mini["verdict"], mini["diff_requests"]) == ("differs", -2)
    assert "requests" in mini["differing"].split(",")
    # a tolerance wide enough lets a small difference pass, never a missing group
    config = tmp_path / "meter.toml"
    config.write_text("[reconcile]\ntolerance = 0.9\n")
    loose = reconcile(provider, ledger, "--by", "day,model", "--config", str(config))
    assert loose.returncode == 1 and groups(loose)[("2026-03-01", "gpt-4o-mini")]["verdict"] == "match"


def test_a_tier_priced_differently_shows_as_cost(provider: UpstreamProcess, tmp_path: Path) -> None:
    # meter priced a flex request at the default rate: tokens agree, the day's cost does not
    ledger = seed(
        tmp_path / "m.duckdb",
        [record(D1 + dt.timedelta(hours=1), tier="flex", cost="0.002"), record(D1 + dt.timedelta(hours=2), cost="0.002")],
    )
    tell(provider, usage=[usage(D1, 1, tier="flex"), usage(D1, 1)], costs=[cost(D1, 0.003)])
    tiers = reconcile(provider, ledger, "--by", "day,tier")
    assert tiers.returncode == 0, tiers
    assert {k[1] for k in groups(tiers)} == {"default", "flex"}
    day = reconcile(provider, ledger, "--by", "day")
    assert day.returncode == 1
    row = groups(day)[("2026-03-01",)]
    assert (row["verdict"], row["differing"], row["diff_cost_usd"]) == ("differs", "cost_usd", "0.001000000")


def test_day_boundary_is_utc_started_at(provider: UpstreamProcess, tmp_path: Path) -> None:
    last = D2 - dt.timedelta(microseconds=100)
    ledger = seed(tmp_path / "m.duckdb", [record(last), record(D2), record(D2 + dt.timedelta(hours=23, minutes=59))])
    tell(provider, usage=[usage(D1, 1), usage(D2, 2)])
    result = reconcile(provider, ledger, "--by", "day", "--until", "2026-03-02")
    assert result.returncode == 0, result
    found = groups(result)
    assert (found[("2026-03-01",)]["meter_requests"], found[("2026-03-02",)]["meter_requests"]) == (1, 2)
    # a --since inside a day widens to the whole UTC day the provider reports
    widened = reconcile(provider, ledger, "--by", "day", "--since", "2026-03-01T22:00:00+05:00", "--until", "2026-03-02")
    assert widened.returncode == 0 and json.loads(widened.stdout)["since"] == "2026-03-01T00:00:00+00:00"


def test_keys_unmapped_and_ambiguous_are_said_never_guessed(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [record(D1 + dt.timedelta(hours=1)), record(D1 + dt.timedelta(hours=2), key=KEY_B)])
    tell(provider, usage=[usage(D1, 1), usage(D1, 1, key="key_b"), usage(D1, 4, key="key_gone")])
    result = reconcile(provider, ledger, "--by", "day,key")
    assert result.returncode == 1
    found = groups(result)
    assert found[("2026-03-01", "sk-...AAA1")]["verdict"] == "match"
    assert found[("2026-03-01", "sk-...BBB2")]["verdict"] == "match"
    assert found[("2026-03-01", "unmapped:key_gone")]["verdict"] == "meter_missing"
    assert "key_gone" in result.stderr
    twins = {PROJECT: [*LISTING[PROJECT], {"id": "key_c", "name": "c", "redacted_value": "sk-proj-cc****AAA1"}]}
    tell(provider, usage=[usage(D1, 1)], keys=twins)
    ambiguous = reconcile(provider, ledger, "--by", "day,key", fmt="table")
    assert "ambiguous:sk-...AAA1" in ambiguous.stdout and "2 provider keys end in sk-...AAA1" in ambiguous.stdout, ambiguous.stdout


def test_admin_key_absent_is_one_line_exit_2(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [])
    result = reconcile(provider, ledger, key=None)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "OPENAI_ADMIN_KEY" in result.stderr, result.stderr
    wrong = reconcile(provider, ledger, key="sk-admin-wrong")
    assert wrong.returncode == 2 and "refused the admin key" in wrong.stderr and "sk-admin-wrong" not in wrong.stderr


def test_providers_without_the_api_one_line_exit_2(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [])
    env = {**os.environ, "OPENAI_ADMIN_KEY": ADMIN}
    azure = subprocess.run(
        [sys.executable, "-m", "meter", "reconcile", "--ledger", ledger, "--upstream", "https://x.openai.azure.com"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert azure.returncode == 2 and "Azure" in azure.stderr and azure.stderr.count("\n") == 1
    tell(provider)
    gateway = subprocess.run(
        [sys.executable, "-m", "meter", "reconcile", "--ledger", ledger, "--upstream", provider.url + "/gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert gateway.returncode == 2 and "no organisation usage API" in gateway.stderr and gateway.stderr.count("\n") == 1, gateway.stderr
    down = subprocess.run(
        [sys.executable, "-m", "meter", "reconcile", "--ledger", ledger, "--upstream", "http://gateway-user:gateway-secret@127.0.0.1:9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert down.returncode == 2 and "cannot reach" in down.stderr
    assert "gateway-secret" not in down.stderr and "gateway-user:***@" in down.stderr  # the URL as errors show it


def test_paging_is_followed_to_the_end(provider: UpstreamProcess, tmp_path: Path) -> None:
    days = [D1 + dt.timedelta(days=i) for i in range(3)]
    ledger = seed(tmp_path / "m.duckdb", [record(d + dt.timedelta(hours=5)) for d in days])
    tell(provider, usage=[usage(d) for d in days], page_days=1, page_items=1)
    result = reconcile(provider, ledger, "--by", "day,key", "--until", "2026-03-03")
    assert result.returncode == 0, result
    assert len(groups(result)) == 3
    paths = [r["path_qs"] for r in seen(provider)]
    assert sum("usage/completions" in p for p in paths) == 3 and sum("page=" in p for p in paths) == 2
    assert sum("api_keys" in p for p in paths) == 2  # two keys listed one per page


def test_a_429_is_waited_out_and_retried(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [record(D1 + dt.timedelta(hours=5))])
    tell(provider, usage=[usage(D1)], rate_limit_once=True)
    result = reconcile(provider, ledger, "--by", "day")
    assert result.returncode == 0, result
    statuses = [r["status"] for r in seen(provider)]
    assert statuses[:2] == [429, 200]


USAGE_PATH = "/v1/organization/usage/completions"
COSTS_PATH = "/v1/organization/costs"
PROJECTS_PATH = "/v1/organization/projects"


def bucket(*results: Any, start: Any = None) -> dict[str, Any]:
    return {"object": "bucket", "start_time": int(D1.timestamp()) if start is None else start, "results": list(results)}


def page(*buckets: Any, more: bool = False, next_page: Any = None) -> dict[str, Any]:
    return {"object": "page", "data": list(buckets), "has_more": more, "next_page": next_page}


# (what the provider answers at a path, the --by asked): pages that never end (the same
# cursor again), and answers that are JSON but not the documented shapes.
HOSTILE_ANSWERS: list[tuple[dict[str, Any], str]] = [
    ({USAGE_PATH: page(bucket(), more=True, next_page="again")}, "day"),
    ({PROJECTS_PATH: {"object": "list", "data": [{"id": "p1"}], "has_more": True, "last_id": "p1"}}, "day,key"),
    ({USAGE_PATH: {"object": "page", "data": "not buckets"}}, "day"),
    ({USAGE_PATH: {"object": "page", "data": [1, 2]}}, "day"),
    ({USAGE_PATH: page({"start_time": 0, "results": "none"})}, "day"),
    ({USAGE_PATH: page({"start_time": 0, "results": ["x"]})}, "day"),
    ({USAGE_PATH: page(bucket(start="yesterday"))}, "day"),
    ({USAGE_PATH: page(bucket(start=10**20))}, "day"),
    ({USAGE_PATH: page(bucket({"num_model_requests": "many"}))}, "day"),
    ({USAGE_PATH: page(bucket({"input_tokens": [1]}))}, "day"),
    ({USAGE_PATH: page(bucket({"num_model_requests": 1}), more=True, next_page={"p": 1})}, "day"),
    ({COSTS_PATH: page(bucket({"amount": {"value": float("nan")}}))}, "day"),
    ({COSTS_PATH: page(bucket({"amount": {"value": "a lot"}}))}, "day"),
    ({COSTS_PATH: page(bucket({"amount": 5}))}, "day"),
    ({PROJECTS_PATH: {"object": "list", "data": [7]}}, "day,key"),
    ({f"{PROJECTS_PATH}/{PROJECT}/api_keys": {"object": "list", "data": {"id": "k"}}}, "day,key"),
]


def test_a_provider_answer_of_the_wrong_shape_or_endless_pages_is_one_line_exit_2(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [record(D1 + dt.timedelta(hours=5))])
    for answers, by in HOSTILE_ANSWERS:
        tell(provider, usage=[usage(D1)], costs=[cost(D1, 0.001)], answers=answers)
        try:
            result = reconcile(provider, ledger, "--by", by, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"reconcile did not end: {answers}")
        assert result.returncode == 2 and result.stdout == "", (answers, result)
        assert result.stderr.startswith("meter: error: reconcile: ") and result.stderr.count("\n") == 1, (answers, result.stderr)
        assert ADMIN not in result.stderr
    # the same pages in the documented shape still reconcile
    tell(provider, usage=[usage(D1)], costs=[cost(D1, 0.001)])
    assert reconcile(provider, ledger, "--by", "day").returncode == 0


def test_postgres_ledger(provider: UpstreamProcess, pg_url: str) -> None:  # noqa: F811
    store = PostgresStore(pg_url)
    store.open()
    try:
        store.write([record(D2 - dt.timedelta(microseconds=1)), record(D2)])
    finally:
        store.close()
    tell(provider, usage=[usage(D1), usage(D2)], costs=[cost(D1, 0.001), cost(D2, 0.001)])
    result = reconcile(provider, pg_url, "--by", "day,model,tier", "--until", "2026-03-02")
    assert result.returncode == 0, result
    assert len(groups(result)) == 2


def test_meter_side_from_a_running_meter(provider: UpstreamProcess, tmp_path: Path) -> None:
    ledger = seed(tmp_path / "m.duckdb", [record(D1 + dt.timedelta(hours=3)), record(D1 + dt.timedelta(hours=4), key=KEY_B)])
    tell(provider, usage=[usage(D1), usage(D1, key="key_b")])
    meter = MeterProcess(["--ledger", ledger, "--upstream", provider.url], env={"METER_CONFIG": ""}).start()
    try:
        by_url = reconcile(provider, meter.admin_url, "--by", "day,key")
    finally:
        meter.stop()
    assert by_url.returncode == 0, by_url
    assert set(groups(by_url)) == {("2026-03-01", "sk-...AAA1"), ("2026-03-01", "sk-...BBB2")}


def test_a_request_without_the_project_header_is_in_its_keys_project(provider: UpstreamProcess, tmp_path: Path) -> None:
    headerless = record(D1 + dt.timedelta(hours=2))
    headerless.project = None  # a project key sent without OpenAI-Project
    ledger = seed(tmp_path / "m.duckdb", [record(D1 + dt.timedelta(hours=1)), headerless])
    tell(provider, usage=[usage(D1, 2), {**usage(D1, 7), "project_id": "proj_other"}], costs=[cost(D1, 0.002)])
    by_project = reconcile(provider, ledger, "--by", "day,project")
    assert by_project.returncode == 1
    found = groups(by_project)
    assert (found[("2026-03-01", PROJECT)]["verdict"], found[("2026-03-01", PROJECT)]["meter_requests"]) == ("match", 2)
    assert found[("2026-03-01", "proj_other")]["verdict"] == "meter_missing"
    config = tmp_path / "meter.toml"
    config.write_text(f'[reconcile]\nprojects = ["{PROJECT}"]\n')
    chosen = reconcile(provider, ledger, "--by", "day", "--config", str(config))
    assert chosen.returncode == 0, chosen
    assert groups(chosen)[("2026-03-01",)]["provider_requests"] == 2


def test_a_redirecting_provider_never_gets_the_admin_key_sent_on(tmp_path: Path) -> None:
    """urllib follows a 302 to any host and sends the Authorization header (the org
    admin key) again there: the provider's redirect is an error, and nothing leaves."""
    ledger = seed(tmp_path / "m.duckdb", [record(D1)])
    with redirect_elsewhere(302) as redirect:
        result = run_meter_env({"OPENAI_ADMIN_KEY": "sk-admin-SECRET"}, "reconcile", "--ledger", ledger, "--upstream", redirect.url)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result
    assert "answered HTTP 302" in result.stderr and "does not follow redirects" in result.stderr, result.stderr
    assert redirect.reached == [] and "SECRET" not in result.stderr


def test_url_a_redirecting_meter_never_gets_the_admin_token_sent_on(tmp_path: Path) -> None:
    with redirect_elsewhere(307) as redirect:
        env = {"OPENAI_ADMIN_KEY": ADMIN, "METER_ADMIN_TOKEN": "meter-SECRET"}
        result = run_meter_env(env, "reconcile", "--url", redirect.url, "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result
    assert "answered HTTP 307" in result.stderr and "does not follow redirects" in result.stderr, result.stderr
    assert redirect.reached == [] and "SECRET" not in result.stderr


def test_url_malformed_is_one_line_exit_2() -> None:
    result = run_meter_env({"OPENAI_ADMIN_KEY": ADMIN}, "reconcile", "--url", "http://127.0.0.1:abc", "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2 and result.stderr.startswith("meter: error: reconcile: --url: ") and result.stderr.count("\n") == 1, result


class PageServer(SocketServer):
    """A provider that answers every request 200 with `size` bytes of body, a byte every
    `pause` seconds (a trickle) or all at once (`pause` 0)."""

    def __init__(self, size: int, pause: float) -> None:
        super().__init__()
        self.size, self.pause = size, pause

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % self.size)
            if self.pause:
                for _ in range(self.size):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(self.pause)
            else:
                block = b" " * (1 << 20)
                for _ in range(self.size >> 20):
                    writer.write(block)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(("size", "pause", "says"), [(70 << 20, 0.0, "larger than 64 MiB"), (1000, 0.05, "took too long")])
async def test_a_provider_page_is_bounded_in_size_and_in_time(size: int, pause: float, says: str) -> None:
    # `serve --reconcile-every` reads the provider's pages in the serving process: a page
    # without end, or one trickled a byte inside each socket timeout, was read whole
    # (70 MiB held, then 'not JSON') or waited on for as long as it trickled (50 s here).
    from meter.reconcile.provider import ProviderClient, ProviderError

    async with PageServer(size, pause) as server:
        client = ProviderClient(server.url, ADMIN, timeout=0.5)  # a page within 5 s, as a whole
        started = time.monotonic()
        with pytest.raises(ProviderError) as failed:
            await asyncio.get_running_loop().run_in_executor(None, client.usage, D1, D2, ["model"])
    assert says in str(failed.value) and ADMIN not in str(failed.value)
    assert time.monotonic() - started < 10
