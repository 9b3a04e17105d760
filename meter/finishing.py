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
measure: 14 us per call).  The observer of an answer relayed to its end is
finished here too (a JSON answer's parse: ~9 us a call inside the handler, ~7.7
here).  `drain` handles what is queued at once; shutting down calls it before the
addons stop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from .flow import Addons, Flow, finished_record
from .identity import KeyIdentities
from .observe import Observation

log = logging.getLogger("meter")


class FinishedFlows:
    """The flows finished in this turn of the loop, waiting for their records."""

    __slots__ = ("_addons", "_identities", "_queued")

    def __init__(self, addons: Addons, identities: KeyIdentities) -> None:
        self._addons = addons
        self._identities = identities
        self._queued: list[tuple[Flow, Finishing | None]] = []

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, flow: Flow, observer: Finishing | None = None) -> None:
        """Queue a finished flow, with the observer that read its answer to the end (its
        reading, e.g. a JSON body's parse, is made here too); the first of a turn
        schedules the drain.  Called on the loop."""
        queued = self._queued
        if not queued:
            asyncio.get_running_loop().call_soon(self.drain)
        queued.append((flow, observer))

    def drain(self) -> None:
        """Every queued flow's observation and record, made and handed to the addons, in order."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        done, identities = self._addons.done, self._identities
        for flow, observer in queued:
            try:
                if observer is not None:
                    _observe(flow, observer)
                done(flow, finished_record(flow, identities))
            except Exception:  # one flow's failure must not cost the others their rows
                log.exception("could not finish the record of %s %s", flow.method, flow.path)


class Finishing(Protocol):
    """What is left of an observer once its answer is relayed: its reading, and its share
    of the metering budget to give back."""

    def finish(self) -> Observation: ...

    def release(self) -> None: ...


def _observe(flow: Flow, observer: Finishing) -> None:
    try:
        flow.observation = observer.finish()
    except Exception:  # the record is made all the same, from what the flow knows
        log.exception("could not read the answer to %s %s", flow.method, flow.path)
    finally:
        observer.release()
