"""The other replicas' spend, read from the ledger off the request path.

`BudgetSync` is an addon placed after the ledger writer, so its `start` runs once
the ledger is open: it reads every budget's spend in its window before the proxy
admits its first request, then again every flush interval, in an executor
thread, through the Store protocol's `query`.  One statement reads every budget:
the sum of `cost_usd` of matching rows WITHOUT this process's id mark (see
`meter.budgets.spend`), which this process counts itself.  A replica's records
reach the ledger within a flush interval of finishing and this read follows
within another, so a replica learns the others' spend within two flush
intervals.  A read that fails keeps the last figures (a ledger outage never
stops forwarding) and is retried at the next interval.

A month's rows are many (a million rows took DuckDB ~200 ms to sum), too many
to scan twice a second.  So a full read, every `FULL_READ_EVERY` seconds, splits
each window at a cutoff `RECENT` seconds back, and the reads between sum only the
rows that started after the cutoff, adding the full read's sum of those before
it.  The two parts never overlap (they split on `started_at`), so nothing is
counted twice; a row that started before the cutoff but was written after the
full read (a request that ran over an hour, a spool replayed after a long
outage) waits for the next full read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..ledger.store import Store
from .matching import Matcher
from .spend import ZERO, Budgets

log = logging.getLogger("meter.budgets")

FULL_READ_EVERY = 60.0  # seconds between reads of whole windows
RECENT = 3600.0  # how far back the reads between them look


def spend_query(matchers: Sequence[Matcher], windows: Sequence[tuple[datetime, datetime]], unmarked: str | None) -> tuple[str, list[Any]]:
    """One statement, one row: each budget's spend in its window, in order.  With
    `unmarked`, rows whose id starts with it are left out (this process counts them)."""
    params: list[Any] = []

    def p(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    sums = []
    for matcher, (start, end) in zip(matchers, windows, strict=True):
        window = f"started_at >= {p(start)} AND started_at < {p(end)}"
        sums.append(f"coalesce(sum(cost_usd) FILTER (WHERE {window} AND {matcher.sql(params)}), 0)")
    where = f"started_at >= {p(min(w[0] for w in windows))} AND started_at < {p(max(w[1] for w in windows))}"
    if unmarked is not None:
        where += f" AND CAST(id AS VARCHAR) NOT LIKE {p(unmarked + '%')}"
    return f"SELECT {', '.join(sums)} FROM requests WHERE {where}", params


def read_spend(store: Store, matchers: Sequence[Matcher], windows: Sequence[tuple[datetime, datetime]], unmarked: str | None) -> list[Decimal]:
    sql, params = spend_query(matchers, windows, unmarked)
    _, rows = store.query(sql, params)
    return [Decimal(v) if v is not None else ZERO for v in rows[0]] if rows else [ZERO] * len(matchers)


class BudgetSync:
    """Addon (after the ledger): the first read at start, then one per interval."""

    def __init__(self, budgets: Budgets, store: Store, interval: float, *, full_read_every: float = FULL_READ_EVERY, recent: float = RECENT) -> None:
        self.budgets = budgets
        self.store = store
        self.interval = interval
        self.full_read_every = full_read_every
        self.recent = recent
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # successful reads (tests, admin)
        self.failing = False
        # The last full read: each budget's sum before the cutoff, for these windows.
        self._base: list[Decimal] | None = None
        self._base_windows: list[tuple[datetime, datetime]] = []
        self._cutoff = datetime.min.replace(tzinfo=UTC)
        self._full_at = 0.0

    async def start(self) -> None:
        if not self.budgets.states:
            return
        await self.sync()
        self._task = asyncio.create_task(self._run(), name="meter-budget-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sync()

    async def sync(self) -> bool:
        """Read the ledger's spend now; False (figures kept, logged once) when it cannot."""
        budgets = self.budgets
        loop = asyncio.get_running_loop()
        now = time.time()
        budgets.roll(now)
        windows = budgets.windows()
        matchers = [s.matcher for s in budgets.states]
        full = self._base is None or self._base_windows != windows or now - self._full_at >= self.full_read_every
        cutoff = datetime.fromtimestamp(now - self.recent, UTC) if full else self._cutoff
        recent = [(max(start, cutoff), end) for start, end in windows]
        parts_m, parts_w = (matchers + matchers, [(start, min(cutoff, end)) for start, end in windows] + recent) if full else (matchers, recent)
        try:
            sums = await loop.run_in_executor(None, read_spend, self.store, parts_m, parts_w, budgets.prefix)
        except Exception as exc:  # noqa: BLE001 - an outage: the last figures stand, the next interval retries
            if not self.failing:
                log.warning("budgets: cannot read spend from the ledger (%s); keeping the last figures", type(exc).__name__)
            self.failing = True
            return False
        if self.failing:
            log.info("budgets: reading spend from the ledger again")
        self.failing = False
        if full:
            n = len(matchers)
            self._base, self._base_windows, self._cutoff, self._full_at = sums[:n], windows, cutoff, now
            sums = sums[n:]
        assert self._base is not None
        budgets.set_others(windows, [before + after for before, after in zip(self._base, sums, strict=True)])
        self.reads += 1
        return True
