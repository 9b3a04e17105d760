"""The fleet, run for real on one machine: PostgreSQL, two replicas, Prometheus, an OTLP receiver.

No container engine here, so the compose topology runs as processes: a real
PostgreSQL 15, two `meter serve` replicas writing to it (with an admin token,
as deploy/ runs them), a real Prometheus using the scrape job from
`deploy/prometheus/prometheus.yml` (its bearer token file pointed at one
written here), and an OTLP/HTTP receiver.  10,000 requests split between the replicas must show up identically
in Prometheus, the ledger, `meter report`, and the traces.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import yaml

from .conftest import ROOT, SECRET_KEY
from .otlp_receiver import OTLPReceiver
from .test_prometheus import Prometheus, prometheus_binary

REQUESTS = 10_000
MODEL = "fleet-model"
INPUT_MTOK, OUTPUT_MTOK = Decimal("2.5"), Decimal(10)  # the config's price, USD per million tokens


ADMIN_TOKEN = "fleet-admin-token-4b1e7c9d"


def fleet_scrape_config(targets: list[str], token_file: Path) -> str:
    """deploy/'s Prometheus config, pointed at this machine's replicas and scraped every second.

    Its token comes from deploy's own `authorization` block: only the file it
    names (compose's secret mount) is moved to one that exists here."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "meter"]
    assert job["authorization"]["credentials_file"], "deploy's scrape job sends meter's admin token"
    job["authorization"]["credentials_file"] = str(token_file)
    job["static_configs"] = [{"targets": targets}]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "900ms"
    config.setdefault("global", {})["scrape_interval"] = "1s"
    return yaml.safe_dump(config)


async def test_two_replicas_on_one_postgres_agree_everywhere(upstream, pg_url, meter_process, tmp_path: Path) -> None:
    config = tmp_path / "meter.toml"
    config.write_text(f'[prices."{MODEL}"]\ninput_mtok = {INPUT_MTOK}\noutput_mtok = {OUTPUT_MTOK}\n')
    async with OTLPReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "meter-fleet",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_BSP_MAX_QUEUE_SIZE": str(4 * REQUESTS),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048",
            "METER_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        token_file = tmp_path / "admin-token"
        token_file.write_text(ADMIN_TOKEN + "\n")  # as a secret file often ends; Prometheus trims it
        replicas = [
            meter_process("--upstream", upstream.url, "--ledger", pg_url, "--config", str(config), "--spool", str(tmp_path / f"spool{i}.jsonl"), env=env)
            for i in range(2)
        ]
        prom = Prometheus(prometheus_binary(), "unused:0", tmp_path)
        prom.config.write_text(fleet_scrape_config([r.admin_url.split("//", 1)[1] for r in replicas], token_file))
        await prom.start()
        try:
            sent_input = sent_output = 0
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as http:
                async def one(i: int) -> None:
                    nonlocal sent_input, sent_output
                    usage = {"input_tokens": 100 + i % 900, "output_tokens": 1 + i % 300}
                    sent_input += usage["input_tokens"]
                    sent_output += usage["output_tokens"]
                    replica = replicas[i % 2]
                    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}", "x-fake-usage": json.dumps(usage)}
                    body = json.dumps({"model": MODEL, "input": "hi", "stream": i % 5 == 0})
                    async with http.post(replica.url + "/v1/responses", data=body, headers=headers) as r:
                        assert r.status == 200
                        await r.read()

                for start in range(0, REQUESTS, 500):
                    await asyncio.gather(*(one(i) for i in range(start, min(start + 500, REQUESTS))))

                # Prometheus: the sum over both replicas' counters.
                deadline = time.monotonic() + 30
                total = None
                while time.monotonic() < deadline:
                    total = await prom.value(http, 'sum(meter_requests_total{job="meter"})')
                    if total == REQUESTS:
                        break
                    await asyncio.sleep(0.5)
                assert total == REQUESTS
                scraped = await prom.query(http, "count(up{job=\"meter\"} == 1)")
                assert scraped["data"]["result"][0]["value"][1] == "2"
                # What Prometheus read, nobody else can: the replicas want the token.
                async with http.get(replicas[0].admin_url + "/metrics") as r:
                    assert r.status == 401
        finally:
            for replica in replicas:
                replica.stop()
            prom.stop()

        # The ledger: one row per request, once, from both replicas.
        from meter.ledger import PostgresStore

        store = PostgresStore(pg_url, migrate=False)
        store.open()
        try:
            _, [(rows, distinct, inp, out)] = store.query("SELECT count(*), count(DISTINCT id), sum(input_tokens), sum(output_tokens) FROM requests")
            _, [(size,)] = store.query("SELECT pg_total_relation_size('requests')")
        finally:
            store.close()
        assert (rows, distinct) == (REQUESTS, REQUESTS)
        assert (inp, out) == (sent_input, sent_output)
        print(f"\nPostgreSQL ledger: {size / REQUESTS:.0f} bytes per request, {size / REQUESTS * 1e6 / 2**30:.2f} GiB per million requests")

        # meter report on the PostgreSQL ledger: to the token and the cent.
        report = subprocess.run([sys.executable, "-m", "meter", "report", "--ledger", pg_url, "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert report.returncode == 0, report.stderr
        [totals] = json.loads(report.stdout)
        assert totals["requests"] == REQUESTS
        assert (totals["input_tokens"], totals["output_tokens"]) == (sent_input, sent_output)
        expected_cost = (INPUT_MTOK * sent_input + OUTPUT_MTOK * sent_output) / Decimal(1_000_000)
        assert abs(Decimal(str(totals["cost_usd"])) - expected_cost) < Decimal("0.01")
        assert totals["unpriced_requests"] == 0 and totals["errors"] == 0

        # Traces: one span per request, from both replicas, no raw key anywhere.
        deadline = time.monotonic() + 30
        while len(receiver.spans) < REQUESTS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(receiver.spans) == REQUESTS
        assert all(SECRET_KEY not in json.dumps(s.attributes, default=str) for s in receiver.spans)


async def metric(http: aiohttp.ClientSession, admin_url: str, name: str) -> float:
    async with http.get(admin_url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def test_thirty_second_postgres_outage_under_load(upstream, postgres, meter_process, tmp_path: Path) -> None:
    url = postgres.new_database()
    max_pending = 500
    replica = meter_process(
        "--upstream", upstream.url, "--ledger", url, "--spool", str(tmp_path / "spool.jsonl"),
        "--ledger-max-pending", str(max_pending), "--flush-interval", "0.2",
    )
    sent = 0
    failures: list[int] = []
    highest_pending = 0.0
    async with aiohttp.ClientSession() as http:
        async def client(stop_at: float) -> None:
            nonlocal sent
            while time.monotonic() < stop_at:
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET_KEY}"}
                async with http.post(replica.url + "/v1/responses", data=b'{"model": "gpt-4o", "input": "x"}', headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        failures.append(r.status)
                sent += 1

        await asyncio.gather(*(client(time.monotonic() + 1) for _ in range(8)))
        postgres.stop()
        try:
            outage_end = time.monotonic() + 30
            load = asyncio.gather(*(client(outage_end) for _ in range(8)))
            while time.monotonic() < outage_end:
                highest_pending = max(highest_pending, await metric(http, replica.admin_url, "meter_ledger_pending_records"))
                async with http.get(replica.admin_url + "/readyz") as r:
                    assert r.status == 200  # a ledger outage never takes the replica out of the load balancer
                await asyncio.sleep(0.5)
            await load
            errors = await metric(http, replica.admin_url, "meter_ledger_write_errors_total")
        finally:
            postgres.start()
        during = sent
        await asyncio.gather(*(client(time.monotonic() + 1) for _ in range(8)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and await metric(http, replica.admin_url, "meter_ledger_pending_records") > 0:
            await asyncio.sleep(0.1)
    replica.stop()  # a spool written during the outage is replayed at the latest here
    assert not failures  # forwarding went on throughout
    assert during > 1000  # it was under load
    assert errors >= 1
    # Bounded: past the limit records go to the spool (the writer wakes at the limit,
    # so a moment's arrivals may sit above it before they are spilled).
    assert 0 < highest_pending <= 2 * max_pending
    from meter.ledger import PostgresStore

    store = PostgresStore(url, migrate=False)
    store.open()
    try:
        _, [(rows, distinct)] = store.query("SELECT count(*), count(DISTINCT id) FROM requests")
    finally:
        store.close()
    assert rows == distinct == sent  # every request exactly once
