"""A batch of records as it crosses to the ledger process, and back into records there.

The proxy's writer thread pays for this under the GIL, so it is the least work
that moves a batch: each record as a plain tuple (one `attrgetter` call in C),
`marshal`ed in chunks of `CHUNK_ROWS`.  marshal writes tuples of str, int, float
and None in less than half of pickle's time (it keeps no memo), and a chunk at a
time bounds how long one call holds the GIL (~0.2 ms) where one pickle of a
whole batch held it for milliseconds, a request's wait.  The cost, a `Decimal`
marshal cannot write, travels as its text beside the rows.  A chunk marshal
refuses (a value of another type; meter makes none) goes as a pickle instead.

The ledger process reads a batch back either as records (`decode_batch`) or,
cheaper, as one list per field (`decode_columns`): the usual batch needs no
sanitising (`sanitise.columns_need_nothing` tells it a column at a time) and goes
to DuckDB column by column, with no `Record` made per row.
"""

from __future__ import annotations

import marshal
import operator
import pickle
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ..record import FIELDS, Record

CHUNK_ROWS = 256
_COST = FIELDS.index("cost_usd")
_row_without_cost = operator.attrgetter(*(name for name in FIELDS if name != "cost_usd"))
_cost = operator.attrgetter("cost_usd")
_ROW_FIELDS = tuple(name for name in FIELDS if name != "cost_usd")  # a row's values, in order

Chunk = tuple[str, bytes]  # ("m", marshal data) or ("p", pickle data) of (rows, costs)


class EncodedBatch(list[Record]):
    """Records with their encoding made beforehand (`LedgerWriter` does it on the event
    loop, a slice at a time); `chunks` is None once a record changed since."""

    chunks: list[Chunk] | None = None
    linked: bool | None = None  # whether a record has a `session_of` or `attribution_of` to settle; None: not known


def encode_batch(records: Sequence[Record]) -> list[Chunk]:
    chunks: list[Chunk] = []
    for start in range(0, len(records), CHUNK_ROWS):
        part = records[start : start + CHUNK_ROWS]
        data = ([_row_without_cost(r) for r in part], [None if c is None else str(c) for c in map(_cost, part)])
        try:
            chunks.append(("m", marshal.dumps(data, 4)))
        except ValueError:  # a value marshal cannot write
            chunks.append(("p", pickle.dumps(data, pickle.HIGHEST_PROTOCOL)))
    return chunks


def decode_columns(chunks: Sequence[Chunk]) -> dict[str, list[Any]]:
    """The batch as one list per field of `Record` (in `FIELDS` order), the cost as the
    text it travelled as (None where there is none): each chunk's rows transposed in C,
    no per-row Python."""
    columns: list[list[Any]] = [[] for _ in _ROW_FIELDS]
    costs: list[str | None] = []
    for kind, blob in chunks:
        rows, chunk_costs = marshal.loads(blob) if kind == "m" else pickle.loads(blob)  # from meter's own proxy process only
        for column, values in zip(columns, zip(*rows)):
            column.extend(values)
        costs.extend(chunk_costs)
    by_name = dict(zip(_ROW_FIELDS, columns))
    return {name: costs if name == "cost_usd" else by_name[name] for name in FIELDS}


def decode_batch(chunks: Sequence[Chunk]) -> list[Record]:
    records = []
    for kind, blob in chunks:
        rows, costs = marshal.loads(blob) if kind == "m" else pickle.loads(blob)  # from meter's own proxy process only
        for row, cost in zip(rows, costs):
            values = (*row[:_COST], None if cost is None else Decimal(cost), *row[_COST:])
            records.append(Record(*values))
    return records
