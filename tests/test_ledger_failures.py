"""The DuckDB ledger under failure: its file taken away or damaged, its disk full.

Real parts throughout: meter's own server with its ledger process, the fake
provider as a process of its own, the official SDK as the client, DuckDB files
(on a small tmpfs where a disk must fill).  Every test counts what the client was
answered against what the ledger holds: nothing lost, nothing twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import openai
import pytest

from meter.ledger.duckdb_store import DuckDBStore
from meter.ledger.schema import mint_ids
from meter.record import Record

from .conftest import SECRET_KEY, ledger_rows
from .test_ledger_hostile import assert_one_line_exit_2, serve_once


async def answered(client: openai.AsyncOpenAI, n: int, text: str) -> list[str]:
    """The response ids of n calls, one after the other."""
    return [(await client.responses.create(model="gpt-4o", input=text)).id for _ in range(n)]


def response_ids(path: Path) -> list[str]:
    return [row["response_id"] for row in ledger_rows(path)]


@pytest.mark.parametrize("how", ["deleted", "moved aside"])
async def test_a_ledger_file_taken_away_while_serving_loses_no_record(upstream: Any, start_meter: Any, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted (by mistake) or moved aside (a rotation by `mv`): the ledger process
    still has the old file open, and every row it commits there afterwards is gone
    with it or lands in the wrong file.  The records made after it are written to
    the file at the configured path instead, once each."""
    ledger = tmp_path / "ledger.duckdb"
    meter = await start_meter(upstream.url, ledger=str(ledger))
    client = openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key=SECRET_KEY, max_retries=0)
    before = await answered(client, 3, "before")
    await meter.flush()
    moved = tmp_path / "ledger-old.duckdb"
    if how == "deleted":
        ledger.unlink()
        Path(f"{ledger}.wal").unlink(missing_ok=True)
    else:
        ledger.rename(moved)
    after = await answered(client, 5, "after")
    await meter.flush()
    await meter.stop()
    assert sorted(response_ids(ledger)) == sorted(after)
    if how == "moved aside":
        assert sorted(response_ids(moved)) == sorted(before)  # the rotated file keeps its own rows, and no more
    assert any("deleted or replaced" in r.getMessage() for r in caplog.records)


def damaged_ledger(tmp_path: Path, damage: str) -> Path:
    """A meter ledger with rows, then cut short or with a block overwritten (a disk
    fault, a copy that stopped half-way)."""
    path = tmp_path / "ledger.duckdb"
    store = DuckDBStore(str(path))
    store.open()
    records = [Record(id=None, started_at=1_777_636_800.0 + i, finished_at=1_777_636_801.0 + i, method="POST", path="/v1/responses", endpoint="responses") for i in range(2000)]
    mint_ids(records)
    store.write(records)
    store.close()
    size = path.stat().st_size
    if damage == "cut short":
        os.truncate(path, size // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(3 * 4096)  # past the headers: the first blocks of the catalog
            f.write(b"\x5a" * 8192)
    return path


@pytest.mark.parametrize("damage", ["cut short", "a block overwritten"])
def test_start_fails_on_a_damaged_ledger(tmp_path: Path, damage: str) -> None:
    """A ledger DuckDB cannot read can never be written: start-up ends with one line
    naming it (SPEC §2b), instead of serving with every record waiting for a ledger
    that will never open, and leaves the file as it is for a person to look at."""
    ledger = damaged_ledger(tmp_path, damage)
    kept = ledger.read_bytes()
    done = serve_once("--ledger", str(ledger), timeout=20)
    assert_one_line_exit_2(done, str(ledger), "damaged")
    assert ledger.read_bytes() == kept
