"""`meter reprice`: stored usage priced again with today's prices and config (SPEC §5).

`reprice(store, since, repricer)` reads every row with usage (from `since` on)
through `store.iter_query` one batch at a time, computes each row's cost with
the proxy's own `Pricer` and usage invariants (a row that breaks one stays
unpriced, as does one that held a number too large for the ledger), and hands
the rows whose cost changed (NULL <-> value included) to `store.set_costs` as
a generator, which writes them in one transaction.  Rows
are never all in memory: reading, pricing and writing move together, so the
memory a reprice takes does not grow with the ledger (scripts/bench_reprice.py
measures it on a million rows on each store).  A dry run only counts what the
generator yields.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..bounds import OVERFLOW_ERROR
from ..ledger import HAS_USAGE_SQL, Store
from ..observe import Usage, usage_anomalies
from ..prices import Pricer
from .query import NANO

# The stored columns repricing reads, in this order.
REPRICE_COLUMNS = (
    "id",
    "started_at",
    "endpoint",
    "model_requested",
    "model",
    "service_tier",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "web_search_calls",
    "cost_usd",
)


def reprice_select_sql(dialect: str, since: dt.datetime | None) -> tuple[str, list[Any]]:
    """The rows with usage, in `REPRICE_COLUMNS` order: the id as text, `started_at` as epoch seconds."""
    epoch = "epoch(started_at)" if dialect == "duckdb" else "extract(epoch FROM started_at)::float8"
    cols = [("id::VARCHAR" if dialect == "duckdb" else "id::text") + " AS id", f"{epoch} AS started_at", *REPRICE_COLUMNS[2:]]
    # A row that held a number too large for the ledger has it NULL (`bounds.note_overflow`):
    # priced from the counts that remain, it would cost less than it did.  It stays unpriced.
    sql = f"SELECT {', '.join(cols)} FROM requests WHERE {HAS_USAGE_SQL} AND error_type IS DISTINCT FROM '{OVERFLOW_ERROR}'"
    params: list[Any] = []
    if since is not None:
        params.append(since)
        sql += " AND started_at >= $1"
    return sql, params


def _as_cost(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value).quantize(NANO)


class Repricer:
    """Today's price of stored rows, through the same `Pricer` the proxy uses.

    The rule is `Pricer.price_record`'s: rows breaking a SPEC §3 invariant
    (checked again on the stored columns, with the proxy's own
    `usage_anomalies`) stay unpriced; the model is the served one, else the
    requested one; the served tier and `started_at` pick the price.  Rows are
    taken as tuples in `REPRICE_COLUMNS` order, since a reprice may cover
    millions of them.
    """

    def __init__(self, pricer: Pricer) -> None:
        self.pricer = pricer
        self._usage = Usage()  # one scratch object, refilled per row

    def anomalies(self, endpoint: str | None, inp: Any, cached: Any, cache_write: Any, out: Any, reasoning: Any, total: Any) -> tuple[str, ...]:
        u = self._usage
        u.input_tokens, u.cached_tokens, u.cache_write_tokens = inp, cached, cache_write
        u.output_tokens, u.reasoning_tokens, u.total_tokens = out, reasoning, total
        return usage_anomalies(u, has_output=endpoint != "embeddings")

    def cost_of(self, row: Sequence[Any]) -> Decimal | None:
        """The cost of one row with usage (as `reprice_select_sql` selects them), or None: unpriced."""
        _id, started, endpoint, model_requested, model, tier, inp, cached, cw, out, reasoning, total, searches = row[:13]
        if self.anomalies(endpoint, inp, cached, cw, out, reasoning, total):
            return None
        return _as_cost(self.pricer.cost(model or model_requested, tier, float(started), inp, cached, cw, out, reasoning, searches))


@dataclass
class Tally:
    """What a reprice saw: rows with usage, rows whose cost changed, and the sum of the changes."""

    seen: int = 0
    changed: int = 0
    delta: Decimal = field(default_factory=Decimal)


def changes(batches: Iterable[Sequence[Sequence[Any]]], repricer: Repricer, tally: Tally) -> Iterator[tuple[str, Decimal | None]]:
    """(id, new cost) of each row whose cost changes, counted into `tally` as they go by."""
    cost_of = repricer.cost_of
    for batch in batches:
        tally.seen += len(batch)
        for row in batch:
            old = _as_cost(row[13])
            new = cost_of(row)
            if new != old:
                tally.changed += 1
                tally.delta += (new or 0) - (old or 0)
                yield row[0], new


def reprice(store: Store, since: dt.datetime | None, repricer: Repricer, *, dry_run: bool = False) -> Tally:
    """Reprice the rows with usage from `since` on; a dry run reads and prices but writes nothing."""
    sql, params = reprice_select_sql(store.dialect, since)
    tally = Tally()
    stream = changes(store.iter_query(sql, params), repricer, tally)
    if dry_run:
        collections.deque(stream, maxlen=0)  # run the generator to its end, keeping nothing
    else:
        store.set_costs(stream)
    return tally


def format_delta(delta: Decimal) -> str:
    """`+$0.5`, `-$1.89806`, `+$0`: the sign always, no trailing zeros."""
    sign = "-" if delta < 0 else "+"
    return f"{sign}${format(abs(delta).quantize(NANO), 'f').rstrip('0').rstrip('.') or '0'}"
