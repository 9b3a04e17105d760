"""The ledger process's column path (issue #16, item 1): the same rows and counts as
the record path, for every batch.

The ledger process writes the usual batch column by column: `sanitise.columns_need_nothing`
decides once per batch that sanitising would change nothing, and `DuckDBStore.write_columns`
appends the columns through DuckDB's appender into a staging table.  Any other batch is
sanitised record by record.  Either way the ledger must hold exactly what the list
parameters of earlier versions wrote (every column, type, NULL and cost digit) and the
cuts must be counted alike; and a retried batch must add nothing, whether the store
remembers it or has to look it up.
"""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from meter.ledger import duckdb_store
from meter.ledger.child_store import _Child
from meter.ledger.duckdb_store import RECENT_BATCHES, DuckDBStore
from meter.ledger.rows import decode_batch, decode_columns, encode_batch
from meter.ledger.sanitise import columns_need_nothing, sanitise_counting
from meter.record import COLUMNS, FIELDS, Record


def typical(i: int, **fields: Any) -> Record:
    """A finished non-streamed Responses call, as the proxy records one."""
    now = time.time()
    base: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "started_at": now + i * 1e-4,
        "finished_at": now + i * 1e-4 + 0.3071234,
        "method": "POST",
        "path": "/v1/responses",
        "endpoint": "responses",
        "status_code": 200,
        "model_requested": "gpt-4o",
        "model": "gpt-4o-2024-08-06",
        "response_id": f"resp_{i:08d}",
        "upstream_request_id": "req_abc",
        "service_tier": "default",
        "input_tokens": 25 + i,
        "cached_tokens": 0,
        "output_tokens": 9,
        "reasoning_tokens": 0,
        "total_tokens": 34 + i,
        "cost_usd": Decimal("0.000152500") * (i % 7),
        "key_id": "bf71a1719abc5215",
        "key_hint": "sk-...abcd",
        "session_id": f"resp_{i:08d}",
        "ttfb_ms": 209.9979140002688 + i,
        "duration_ms": 306.98334200133104,
        "upstream_processing_ms": 5.0,
        "request_bytes": 58,
        "response_bytes": 0,
    }
    base.update(fields)
    return Record(**base)


def batches() -> list[list[Record]]:
    """Clean batches (the column path) and batches with something to sanitise, count or
    claim (the record path), with columns empty in some rows, all or none."""
    clean = [typical(i) for i in range(300)]
    varied = [
        typical(1000, tags=json.dumps({"team": "é🙂", "n": 1}, ensure_ascii=False), user_id="ü" * 256, project="p", cost_usd=None),
        typical(1001, input_tokens=2**40, total_tokens=2**40 + 5, cost_usd=Decimal("999999999.999999999")),
        typical(1002, status_code=None, model=None, ttfb_ms=None, error_type="server_error", error_code="", stream=True),
        typical(1003, cost_usd=Decimal("-0"), key_name="k", trace_id="0af7651916cd43dd8448eb211c80319c"),
    ]
    return [
        clean,
        varied,
        [typical(2000 + i, cost_usd=Decimal("1.5E-7")) for i in range(3)],  # a cost in exponent form, exact
        [  # cut and cleaned; escapes in the tags looked at
            typical(3000, model="gpt\x00-4o", response_id="r" * 300, cost_usd=Decimal("0.12345678912")),
            typical(3001, tags=json.dumps({"team": "é🙂\u0007"})),
        ],
        [typical(4000, input_tokens=2**63, total_tokens=2**70)],  # overflows, counted
        [typical(5000, background=True), typical(5001, background=True, response_id="resp_00005000")],  # a usage claim
        [typical(6000, cut=("tags",))],  # a cut counted from before the record was made
        [typical(7000 + i, status_code=2**31) for i in range(2)],
        [typical(8000)],  # one row: every column one value, none appended
        [typical(8001, ttfb_ms=-0.0), typical(8002, ttfb_ms=0.0, upstream_processing_ms=0.0)],  # zero's sign kept
    ]


def rows(path: Path) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id").fetchall()
    finally:
        con.close()


def test_the_column_path_writes_what_the_list_parameters_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = [encode_batch(batch) for batch in batches()]
    taken = [columns_need_nothing(columns) and not any(columns["background"]) for columns in map(decode_columns, encoded)]
    assert taken[:3] == [True, True, True] and not any(taken[3:-2]) and all(taken[-2:]), taken  # both paths are exercised

    child = _Child(str(tmp_path / "columns.duckdb"))
    child.answer(0, "open", [])
    cuts = [child.answer(i + 1, "write", [chunks]) for i, chunks in enumerate(encoded)]
    assert isinstance(child.store, DuckDBStore) and child.store._staging is not None  # the appender was used
    child.close()

    monkeypatch.setattr(duckdb_store, "can_append", lambda con: False)
    store = DuckDBStore(str(tmp_path / "lists.duckdb"))
    store.open()
    expected_cuts = []
    for chunks in encoded:
        records = decode_batch(chunks)
        expected_cuts.append(sanitise_counting(records))
        store.write(records)
    assert store._staging is None
    store.close()

    assert cuts == expected_cuts
    assert cuts[3] == ({"response_id": 1}, {})
    assert cuts[4] == ({}, {"responses": 1}) and cuts[6] == ({"tags": 1}, {})
    written, expected = rows(tmp_path / "columns.duckdb"), rows(tmp_path / "lists.duckdb")
    assert len(written) == sum(map(len, batches()))
    assert written == expected
    # The types as the table has them: the appender's staging changes none.
    con = duckdb.connect(str(tmp_path / "columns.duckdb"), read_only=True)
    try:
        tags, cost, tokens = con.execute("SELECT tags, cost_usd, input_tokens FROM requests WHERE tags IS NOT NULL AND user_id IS NOT NULL").fetchall()[0]
        big = con.execute("SELECT max(input_tokens), max(cost_usd) FROM requests").fetchall()[0]
        signs = con.execute("SELECT DISTINCT ttfb_ms::VARCHAR FROM requests WHERE ttfb_ms = 0 ORDER BY 1").fetchall()
    finally:
        con.close()
    assert json.loads(tags) == {"team": "é🙂", "n": 1} and cost is None and tokens == 1025
    assert big == (2**40, Decimal("999999999.999999999"))
    assert signs == [("-0.0",), ("0.0",)]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tags": '{"a":"b\\u0007"}'},
        {"tags": '{"a":"\\\\"}'},
        {"user_id": "x\x7f"},
        {"model": "m" * 257},
        {"project": "p" * 256},
        {"input_tokens": 2**62, "output_tokens": 2**62},
        {"input_tokens": True},
        {"status_code": -(2**31) - 1},
        {"cost_usd": Decimal("1E+9")},
        {"cost_usd": Decimal("NaN")},
        {"cost_usd": Decimal("0.0000000001")},
        {"cost_usd": Decimal("1E-10")},
        {"cost_usd": Decimal("0E-9")},
        {"cost_usd": Decimal("1.5E-7")},
        {"method": 0},
        {"key_hint": 5},
        {"cut": ("request",)},
    ],
)
def test_a_batch_said_to_need_nothing_is_one_sanitise_leaves_alone(fields: dict[str, Any]) -> None:
    records = [typical(0), typical(1, **fields)]
    needs_nothing = columns_need_nothing(decode_columns(encode_batch(records)))
    decoded = decode_batch(encode_batch(records))
    before = [tuple(getattr(r, name) for name in FIELDS) for r in decoded]
    cuts = sanitise_counting(decoded)
    changed = [tuple(getattr(r, name) for name in FIELDS) for r in decoded] != before
    if needs_nothing:
        assert cuts == ({}, {}) and not changed
    assert needs_nothing or fields, "a typical batch takes the column path"


def test_a_retried_batch_adds_nothing_remembered_or_looked_up(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    written = [[typical(100 * b + i) for i in range(50)] for b in range(RECENT_BATCHES + 2)]
    store = DuckDBStore(str(path))
    store.open()
    for batch in written:
        store.write(batch)
    store.write(written[0])  # older than the batches remembered: looked up in the ledger
    store.write(written[-1])  # remembered
    store.write([*written[-2][:10], typical(9999)])  # partly new
    store.close()
    store = DuckDBStore(str(path))  # a fresh process remembers nothing
    store.open()
    store.write(written[-1])
    columns = decode_columns(encode_batch(written[-2]))
    store.write_columns([columns[name] for name in COLUMNS])
    store.close()
    assert len(rows(path)) == 50 * len(written) + 1
