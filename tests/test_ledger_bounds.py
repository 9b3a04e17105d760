"""Text from outside is bounded before it can hold the ledger back: every value a
client or an upstream sends into a text column is cut to what the ledger keeps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .conftest import ledger_rows
from .test_ledger_hostile import metric, metrics_text, raw_request


def test_serve_cuts_a_huge_service_tier_and_the_ledger_goes_on(upstream: Any, meter_process: Any, tmp_path: Path) -> None:
    """`service_tier` in a request body was kept whole: a 40 MB value failed the ledger
    process's insert for memory (a DuckDB OutOfMemoryException, which is the store's
    outage, not a refusal), so the batch was retried for ever, every later record
    waited behind it, and the spool replayed it into the same failure at the next
    start.  It is cut to the ledger's 256 characters, like the other text from outside."""
    ledger = tmp_path / "l.duckdb"
    meter = meter_process("--upstream", upstream.url, "--ledger", str(ledger), "--flush-interval", "0.05")
    huge = json.dumps({"model": "gpt-4o", "input": "hi", "service_tier": "a" * 40_000_000}).encode()
    raw_request(meter.port, b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n", huge)
    normal = json.dumps({"model": "gpt-4o", "input": "hi"}).encode()
    for _ in range(5):
        raw_request(meter.port, b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n", normal)
    deadline = time.monotonic() + 20
    while metric(meter.admin_port, "meter_ledger_written_records_total") < 6:
        assert time.monotonic() < deadline, f"the ledger stopped writing: {metrics_text(meter.admin_port)[-2000:]}"
        time.sleep(0.1)
    meter.stop()
    rows = ledger_rows(ledger)
    assert len(rows) == 6
    assert sorted(len(r["service_tier_requested"] or "") for r in rows) == [0, 0, 0, 0, 0, 256]
