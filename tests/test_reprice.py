"""`meter reprice` (SPEC §5): stored usage priced again with today's prices and config.

Costs are checked against arithmetic done by hand from a config override
(`acme-model`: input $2, cached $0.50, cache writes $2.50, output $8 per
million tokens, $0.01 per web search) and gpt-4o's list price ($2.50 / $10).
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from .conftest import ledger_rows
from .many_rows import duckdb_ledger, duckdb_rows, postgres_ledger, postgres_rows, run_with_peak
from .test_report import D1, assert_one_line_error, make_record, run_meter, run_meters, seed

PRICES = """
[prices."acme-model"]
input_mtok = 2
cached_mtok = 0.5
cache_write_mtok = 2.5
output_mtok = {output}
web_search_per_call = 0.01
"""

OLD = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def config(tmp_path: Path, output: str = "8") -> Path:
    path = tmp_path / "meter.toml"
    path.write_text(PRICES.format(output=output))
    return path


def records() -> list:
    acme = {"model": "acme-model", "at": D1}
    return [
        # r1: NULL -> (1000-200-100)*2 + 200*0.5 + 100*2.5 + 500*8 = 5750 per M = 0.00575, + 2 searches * 0.01 = 0.02575
        make_record(response_id="r1", **acme, input_tokens=1000, cached_tokens=200, cache_write_tokens=100, output_tokens=500, reasoning_tokens=100, web_search_calls=2, cost_usd=None),
        # r2: wrong -> 100*2 + 10*8 = 280 per M = 0.00028
        make_record(response_id="r2", **acme, input_tokens=100, output_tokens=10, cost_usd=Decimal(1)),
        # r3: already right
        make_record(response_id="r3", **acme, input_tokens=100, output_tokens=10, cost_usd=Decimal("0.00028")),
        # r4: cached > input breaks an invariant: its cost goes
        make_record(response_id="r4", **acme, input_tokens=100, cached_tokens=150, output_tokens=10, cost_usd=Decimal("0.5")),
        # r5: reasoning > output, already NULL: stays
        make_record(response_id="r5", **acme, input_tokens=10, output_tokens=5, reasoning_tokens=6, cost_usd=None),
        # r6: total != input + output: its cost goes
        make_record(response_id="r6", **acme, input_tokens=10, output_tokens=5, total_tokens=99, cost_usd=Decimal("0.1")),
        # r7: served on flex: an override is a standard-tier price, so unpriced
        make_record(response_id="r7", **acme, service_tier="flex", input_tokens=100, output_tokens=10, cost_usd=Decimal("0.00028")),
        # r8: a model nobody prices
        make_record(response_id="r8", at=D1, model="no-such-model-xyz", input_tokens=10, output_tokens=1, cost_usd=Decimal("0.3")),
        # r9: no usage: not a candidate
        make_record(at=D1, method="GET", path="/v1/models", endpoint="other", cost_usd=None),
        # r10: no model in the answer: the requested one prices it; 1000*2 = 0.002
        make_record(response_id="r10", at=D1, model_requested="acme-model", endpoint="responses.compact", input_tokens=1000, output_tokens=0, cost_usd=None),
        # r11: embeddings (no output), right already: 500*2 = 0.001
        make_record(response_id="r11", at=D1, model="acme-model", endpoint="embeddings", path="/v1/embeddings", input_tokens=500, total_tokens=500, cost_usd=Decimal("0.001")),
        # r12: an old row, NULL -> 0.00028
        make_record(response_id="r12", model="acme-model", at=OLD, input_tokens=100, output_tokens=10, cost_usd=None),
        # r13: gpt-4o at its list price: 1000*2.5 + 100*10 = 3500 per M = 0.0035
        make_record(response_id="r13", at=D1, model="gpt-4o", service_tier="default", input_tokens=1000, output_tokens=100, cost_usd=None),
    ]


EXPECTED = {
    "r1": Decimal("0.02575"),
    "r2": Decimal("0.00028"),
    "r3": Decimal("0.00028"),
    "r4": None,
    "r5": None,
    "r6": None,
    "r7": None,
    "r8": None,
    "r10": Decimal("0.002"),
    "r11": Decimal("0.001"),
    "r12": Decimal("0.00028"),
    "r13": Decimal("0.0035"),
}


def costs(path: Path) -> dict[str | None, Decimal | None]:
    return {r["response_id"]: r["cost_usd"] for r in ledger_rows(path) if r["response_id"]}


def parse_summary(stdout: str) -> tuple[int, int, Decimal]:
    m = re.fullmatch(r"(?:repriced|would reprice) (\d+) of (\d+) rows; cost ([+-])\$([0-9.]+)\n", stdout)
    assert m, stdout
    sign = -1 if m.group(3) == "-" else 1
    return int(m.group(1)), int(m.group(2)), sign * Decimal(m.group(4))


def test_reprice_fixes_costs_then_changes_nothing(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "l.duckdb", records())
    cfg = config(tmp_path)
    first = run_meter("reprice", "--ledger", str(ledger), "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    # changed: r1 r2 r4 r6 r7 r8 r10 r12 r13; unchanged: r3 r5 r11; r9 has no usage
    # +0.02575 -0.99972 -0.5 -0.1 -0.00028 -0.3 +0.002 +0.00028 +0.0035 = -1.86847
    assert first.stdout == "repriced 9 of 12 rows; cost -$1.86847\n"
    assert parse_summary(first.stdout) == (9, 12, Decimal("-1.86847"))
    assert costs(ledger) == EXPECTED
    assert len(ledger_rows(ledger)) == 13
    second = run_meter("reprice", "--ledger", str(ledger), "--config", str(cfg))
    assert second.stdout == "repriced 0 of 12 rows; cost +$0\n"
    assert costs(ledger) == EXPECTED


def test_new_override_price_changes_what_it_touches(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "l.duckdb", records())
    assert run_meter("reprice", "--ledger", str(ledger), "--config", str(config(tmp_path))).returncode == 0
    dearer = config(tmp_path, output="9")  # output $8 -> $9 per million
    result = run_meter("reprice", "--ledger", str(ledger), "--config", str(dearer))
    # r1 (500 out): +0.0005; r2, r3, r12 (10 out): +0.00001 each; r10 and r11 have no output
    assert result.stdout == "repriced 4 of 12 rows; cost +$0.00053\n"
    got = costs(ledger)
    assert got["r1"] == Decimal("0.02625") and got["r2"] == got["r3"] == got["r12"] == Decimal("0.00029")
    assert got["r10"] == Decimal("0.002") and got["r13"] == Decimal("0.0035")


def test_since_limits_the_rows(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "l.duckdb", records())
    cfg = str(config(tmp_path))
    recent = run_meter("reprice", "--ledger", str(ledger), "--config", cfg, "--since", "2026-01-01")
    assert recent.stdout == "repriced 8 of 11 rows; cost -$1.86875\n"
    assert costs(ledger)["r12"] is None
    rest = run_meter("reprice", "--ledger", str(ledger), "--config", cfg)
    assert rest.stdout == "repriced 1 of 12 rows; cost +$0.00028\n"
    assert costs(ledger) == EXPECTED


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "l.duckdb", records())
    before = costs(ledger)
    result = run_meter("reprice", "--ledger", str(ledger), "--config", str(config(tmp_path)), "--dry-run")
    assert result.stdout == "would reprice 9 of 12 rows; cost -$1.86847\n"
    assert costs(ledger) == before


def test_without_config_the_override_model_is_unpriced(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "l.duckdb", records())
    result = run_meter("reprice", "--ledger", str(ledger))
    assert result.returncode == 0, result.stderr
    got = costs(ledger)
    assert got["r13"] == Decimal("0.0035")
    assert all(got[r] is None for r in EXPECTED if r != "r13")
    # r2 r3 r4 r6 r7 r8 r11 lose their costs (1 + 0.00028 + 0.5 + 0.1 + 0.00028 + 0.3 + 0.001 = 1.90156); r13 gains 0.0035
    assert result.stdout == "repriced 8 of 12 rows; cost -$1.89806\n"


def test_reprice_bad_arguments(tmp_path: Path) -> None:
    ledger = seed(tmp_path / "l.duckdb", records())
    bad_provider = tmp_path / "bad.toml"
    bad_provider.write_text('[prices]\nprovider = "no-such-provider"\n')
    bad_price = tmp_path / "badprice.toml"
    bad_price.write_text('[prices."m"]\ninput_mtok = -1\noutput_mtok = 1\n')
    cases = [
        (["--ledger", str(ledger), "--since", "yesterday-ish"], "--since"),
        (["--ledger", str(tmp_path / "missing.duckdb")], "missing.duckdb"),
        (["--ledger", str(ledger), "--config", str(bad_provider)], "provider"),
        (["--ledger", str(ledger), "--config", str(bad_price)], "price"),
    ]
    # Refused before the ledger is written: side by side, each its own process.
    for (_, word), result in zip(cases, run_meters(*(["reprice", *args] for args, _ in cases))):
        assert_one_line_error(result, word)
    holder = duckdb.connect(str(ledger))  # a running meter holds its file like this
    try:
        line = assert_one_line_error(run_meter("reprice", "--ledger", str(ledger)), str(ledger))
        assert "running meter" in line
    finally:
        holder.close()


def test_reprice_batch_is_fast(tmp_path: Path) -> None:
    """200k rows with usage (mixed models, days and tiers) reprice in one pass and one UPDATE."""
    import time

    n = 200_000
    path = seed(tmp_path / "big.duckdb", [])
    con = duckdb.connect(str(path))
    con.execute(
        """
        INSERT INTO requests (id, started_at, finished_at, method, path, endpoint, outcome, model, service_tier,
                              input_tokens, cached_tokens, output_tokens, reasoning_tokens, total_tokens, cost_usd)
        SELECT uuid(), TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i * 37), TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i * 37 + 1),
               'POST', '/v1/responses', 'responses', 'completed',
               ['gpt-4o', 'gpt-4o-mini', 'acme-model', 'unknown-x'][1 + i % 4], ['default', NULL, 'flex'][1 + i % 3],
               100 + i % 1000, i % 50, 10 + i % 100, i % 10, 110 + i % 1000 + i % 100, NULL
        FROM range(?) AS t(i)
        """,
        [n],
    )
    con.close()
    cfg = str(config(tmp_path))
    t0 = time.monotonic()
    first = run_meter("reprice", "--ledger", str(path), "--config", cfg, timeout=300)
    elapsed = time.monotonic() - t0
    changed, seen, delta = parse_summary(first.stdout)
    assert seen == n and 0 < changed < n and delta > 0
    assert elapsed < 60, elapsed
    again = run_meter("reprice", "--ledger", str(path), "--config", cfg, timeout=300)
    assert parse_summary(again.stdout) == (0, n, Decimal(0))
    con = duckdb.connect(str(path), read_only=True)
    total, priced = con.execute("SELECT sum(cost_usd), count(cost_usd) FROM requests").fetchone()
    con.close()
    assert total == delta and priced == changed


def test_reprice_postgres(pg_url: str) -> None:
    from meter.ledger import PostgresStore

    store = PostgresStore(pg_url)
    store.open()
    try:
        store.write(records())
    finally:
        store.close()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = str(config(Path(tmp)))
        first = run_meter("reprice", "--ledger", pg_url, "--config", cfg)
        assert first.returncode == 0, first.stderr
        assert first.stdout == "repriced 9 of 12 rows; cost -$1.86847\n"
        assert run_meter("reprice", "--ledger", pg_url, "--config", cfg).stdout == "repriced 0 of 12 rows; cost +$0\n"
    store = PostgresStore(pg_url, migrate=False)
    try:
        _names, rows = store.query("SELECT response_id, cost_usd FROM requests WHERE response_id IS NOT NULL")
    finally:
        store.close()
    assert {r[0]: r[1] for r in rows} == EXPECTED


@pytest.mark.parametrize("value", ["0", "1", "12.5"])
def test_format_delta(value: str) -> None:
    from meter.report import format_delta

    assert format_delta(Decimal(value)) == "+$" + value
    assert format_delta(-Decimal(value)) == ("-$" if value != "0" else "+$") + value


# --- bounded memory ---------------------------------------------------------------------

# Rows of `acme-model` with usage and no cost: the config's override prices every one,
# so a reprice changes each row (the most a reprice ever has to write).
BIG_DUCKDB = duckdb_rows("acme-model")
BIG_POSTGRES = postgres_rows("acme-model")


def reprice_peak_rss(ledger: str, cfg: Path, *args: str) -> tuple[str, int]:
    """(stdout, peak RSS in bytes) of one `meter reprice` process."""
    result, peak = run_with_peak(["reprice", "--ledger", ledger, "--config", str(cfg), *args], timeout=300)
    assert peak is not None, result.stderr
    return result.stdout, peak


def reprice_traced_peak(ledger: str, cfg: Path) -> tuple[int, int]:
    """(rows changed, peak bytes of Python objects) of one reprice in this process, every row rewritten."""
    import tracemalloc

    from meter.config import load_settings
    from meter.ledger import open_reader
    from meter.prices import Pricer
    from meter.report.reprice import Repricer, reprice

    settings = load_settings({"config": str(cfg)}, env={})
    repricer = Repricer(Pricer(provider_id=settings.price_provider, upstream_url=settings.upstream, overrides=settings.price_overrides))
    store = open_reader([ledger], writable=True)
    tracemalloc.start()
    try:
        tally = reprice(store, None, repricer)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        store.close()
    return tally.changed, peak


@pytest.mark.parametrize("store", ["duckdb", "postgresql"])
def test_reprice_holds_rows_a_batch_at_a_time(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Reading, pricing and writing stream together: twice the rows, every one rewritten, in the same memory.

    The smaller ledger is two of `iter_query`'s 50,000-row batches: at one batch the
    peak is lower (~40 MiB), at two it is already the steady one (55-66 MiB, the same
    at 150,000, 200,000 and 250,000 rows)."""
    small, big = 100_000, 200_000
    if store == "duckdb":
        ledgers = [duckdb_ledger(tmp_path / f"{n}.duckdb", BIG_DUCKDB, n) for n in (small, big)]
    else:
        postgres = request.getfixturevalue("postgres")
        ledgers = [postgres_ledger(postgres.new_database(), BIG_POSTGRES, n) for n in (small, big)]
    cfg = config(tmp_path)
    peaks = []
    for n, ledger in zip((small, big), ledgers):
        changed, peak = reprice_traced_peak(ledger, cfg)
        assert changed == n
        peaks.append(peak)
    # Measured (tracemalloc, 100,000 -> 200,000 rows): streamed, -7 to 0 MiB; holding every
    # change until the write, +24 MiB; holding every row read, +40 to +48 MiB.
    assert peaks[1] - peaks[0] < 12 * 2**20, f"Python heap peaked at {peaks[0] >> 20} MiB for {small} rows, {peaks[1] >> 20} MiB for {big}"


def test_reprice_process_memory_is_flat_on_postgresql(postgres: Any, tmp_path: Path) -> None:
    """The whole `meter reprice` process, not only its Python objects: the same peak RSS for twice the rows.

    (On DuckDB the engine's own block cache and its one-transaction UPDATE grow
    with the file, under DuckDB's memory limit; scripts/bench_reprice.py shows both.)
    """
    small, big = 100_000, 200_000
    cfg = config(tmp_path)
    peaks = []
    for n in (small, big):
        stdout, peak = reprice_peak_rss(postgres_ledger(postgres.new_database(), BIG_POSTGRES, n), cfg)
        assert parse_summary(stdout)[:2] == (n, n)
        peaks.append(peak)
    # Measured (peak RSS, 100,000 -> 200,000 rows): streamed, +2 MiB; holding every change
    # until the write, +27 MiB; holding every row read, +53 MiB.
    assert peaks[1] - peaks[0] < 12 * 2**20, f"peak RSS {peaks[0] >> 20} MiB at {small} rows, {peaks[1] >> 20} MiB at {big}"
