"""`meter sql` writes every value a query can give, whatever its size: a DECIMAL wider
than Python's default decimal context (28 digits) was a traceback on the command
line and a bare 500 from `POST /api/sql`."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from .test_report import run_meter, seed, seeded_records

WIDE = "SELECT CAST('1000000000000000000000000000000' AS DECIMAL(38,0)) AS big, CAST('-99999999999999999999999999.123456789' AS DECIMAL(38,9)) AS fine, CAST('0.5' AS DECIMAL(18,9)) AS half"


def test_wide_decimals_are_written_exactly_in_every_format(tmp_path: Path) -> None:
    ledger = str(seed(tmp_path / "ledger.duckdb", seeded_records()))
    as_json = run_meter("sql", WIDE, "--ledger", ledger, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    [row] = json.loads(as_json.stdout, parse_float=Decimal)
    assert row == {"big": Decimal(1000000000000000000000000000000), "fine": Decimal("-99999999999999999999999999.123456789"), "half": Decimal("0.5")}
    as_csv = run_meter("sql", WIDE, "--ledger", ledger, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert as_csv.stdout.splitlines()[1] == "1000000000000000000000000000000.000000000,-99999999999999999999999999.123456789,0.500000000"
    table = run_meter("sql", WIDE, "--ledger", ledger)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[2].split() == ["1000000000000000000000000000000", "-99999999999999999999999999.123456789", "0.5"]


async def test_the_admin_api_answers_a_wide_decimal(upstream: Any, start_meter: Any) -> None:
    meter = await start_meter(upstream.url)
    async with aiohttp.ClientSession() as s, s.post(meter.admin_url + "/api/sql", json={"sql": WIDE}) as r:
        status, text = r.status, await r.text()
    assert status == 200, text
    answer = json.loads(text, parse_float=Decimal)
    assert answer["rows"] == [{"big": Decimal(1000000000000000000000000000000), "fine": Decimal("-99999999999999999999999999.123456789"), "half": Decimal("0.5")}]
