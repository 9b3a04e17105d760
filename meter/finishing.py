"""Finished flows' records, built and heard by the addons together, once per turn of the loop.

A finished flow's record is built (`flow.finished_record`) and handed to every
addon's `done` (usage once, prices, metrics, budgets, the ledger's queue) after
its client has the answer.  Done one flow at a time at the end of each request's
handler, that work runs between aiohttp's own, with the processor's caches cold
for it: in a live `meter serve` under load it cost ~2.5 times what the same calls
cost back to back in `scripts/bench_metering.py` (24 against 11 us per call).
Here the flows that finish in one turn of the event loop are queued and handled
together when the loop next runs its ready callbacks (`call_soon`): in order,
with nothing delayed past that, and under load ~10 at a time (the same live
measure: 14 us per call).  `drain` handles what is queued at once; shutting down
calls it before the addons stop.
"""

from __future__ import annotations

import asyncio
import logging

from .flow import Addons, Flow, finished_record
from .identity import KeyIdentities

log = logging.getLogger("meter")


class FinishedFlows:
    """The flows finished in this turn of the loop, waiting for their records."""

    __slots__ = ("_addons", "_identities", "_queued")

    def __init__(self, addons: Addons, identities: KeyIdentities) -> None:
        self._addons = addons
        self._identities = identities
        self._queued: list[Flow] = []

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, flow: Flow) -> None:
        """Queue a finished flow; the first of a turn schedules the drain.  Called on the loop."""
        queued = self._queued
        if not queued:
            asyncio.get_running_loop().call_soon(self.drain)
        queued.append(flow)

    def drain(self) -> None:
        """Every queued flow's record, built and handed to the addons, in order."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        done, identities = self._addons.done, self._identities
        for flow in queued:
            try:
                done(flow, finished_record(flow, identities))
            except Exception:  # one flow's failure must not cost the others their rows
                log.exception("could not finish the record of %s %s", flow.method, flow.path)
