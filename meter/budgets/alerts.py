"""Budget alerts: one webhook event per budget, window and threshold crossed (SPEC §11).

The budget tracker says when spend crosses a fraction of a budget's limit (a
`Crossing`, through `Alerter.crossed`, which only queues).  A worker task then:

- claims it in the ledger (`alert_claims`, `Store.claim_alert`): of all the
  replicas that see the crossing, and of all the times one sees it again after
  a restart, one claim wins, and only its replica sends;
- POSTs the event (`webhook`) to each webhook that has not accepted it yet, and
  records who has (`Store.update_alert`), retrying with a growing backoff while
  any refuses; `sent_at` is set once all have it;
- holds each claim under a lease it renews at every try, and looks for unsent
  claims at start and every half lease (`Store.take_alerts`): its own (the same
  replica name after a restart), released ones (a meter that stopped with an
  alert unsent releases it), and those whose holder died (the lease ran out).

Every store call runs on the worker's own thread, and the POSTs on its own HTTP
session, so neither a slow ledger nor a slow webhook touches a request: not the
event loop's default executor either, which also resolves the upstream's host
name for a new connection (aiohttp's threaded resolver), and which forty claims
waiting on a ledger that did not answer used to fill for minutes.
`AlertMetrics` exports what was sent and what failed, per budget.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import aiohttp

from ..bounds import storable_cost
from ..exposition import CounterMetricFamily, Metric
from ..ledger.alert_claims import AlertClaim
from ..ledger.store import Store
from .webhook import body_and_headers, fingerprint, host_of, iso_utc, post

log = logging.getLogger("meter.alerts")
T = TypeVar("T")


@dataclass(frozen=True)
class Crossing:
    """Spend of `budget` in the window starting at `window_start` (UTC) reached
    `threshold` (a fraction of `limit_usd`, in (0, 1]); `mode` is the budget's
    (`observe` or `enforce`)."""

    budget: str
    window_start: datetime
    threshold: float
    spend_usd: Decimal
    limit_usd: Decimal
    mode: str


# How long a sender holds a claim before another replica may take it over; it
# renews the lease at every attempt, so retries wait at most a third of it.
LEASE_SECONDS = 60.0
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 20.0
WEBHOOK_TIMEOUT_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0  # for the last try at stop
RELEASE_SECONDS = 5.0  # for the ledger to take the release of what is still unsent
MAX_WAITING = 10_000  # crossings not yet claimed; past it one is dropped (seen again after a restart)


@dataclass
class _Job:
    """One alert on its way: claimed yet or not, the webhooks that have it, when to try next."""

    alert: AlertClaim
    claimed: bool
    attempts: int = 0
    due: float = 0.0  # loop time of the next try


class Alerter:
    """Claims each crossing in the ledger and POSTs it to every webhook, off the request path.

    `crossed` (on the event loop, from the budget tracker) only queues; a worker
    task claims, sends, retries with backoff and records, with every store call in
    an executor thread.  Report every threshold already reached whenever spend is
    known (after a restart too): a repeat costs one claim that loses, and a crossing
    that was never claimed (a crash before it) is then not lost.
    """

    def __init__(
        self,
        store: Store,
        webhooks: Sequence[str],
        *,
        lease: float = LEASE_SECONDS,
        first_retry: float = FIRST_RETRY_SECONDS,
        max_retry: float = MAX_RETRY_SECONDS,
        timeout: float = WEBHOOK_TIMEOUT_SECONDS,
        grace: float = STOP_GRACE_SECONDS,
    ) -> None:
        self.store = store
        self.webhooks = {fingerprint(url): url for url in webhooks}
        self.lease = lease
        self.first_retry = first_retry
        self.max_retry = min(max_retry, lease / 3)
        self.timeout = timeout
        self.grace = grace
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.sent: dict[str, int] = {}  # budget -> events a webhook accepted
        self.failures: dict[str, int] = {}  # budget -> POSTs that failed
        self._waiting: deque[Crossing] = deque()
        self._jobs: dict[tuple[str, datetime, float], _Job] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False

    # the budget tracker's side -------------------------------------------------------

    def crossed(self, crossing: Crossing) -> None:
        """Queue a crossing to claim and send; never blocks, never raises."""
        try:
            if not self.webhooks or self._stopping:
                return
            if len(self._waiting) >= MAX_WAITING:
                log.warning("budget alerts: %d crossings waiting; %s at %g dropped", MAX_WAITING, crossing.budget, crossing.threshold)
                return
            self._waiting.append(crossing)
            wake, loop = self._wake, self._loop
            if wake is not None and loop is not None:
                if threading.get_ident() == self._loop_thread:
                    wake.set()
                else:  # a budget read finished in a worker thread: the event is the loop's
                    loop.call_soon_threadsafe(wake.set)
        except Exception:  # the caller is on a request's path: log, never raise
            log.exception("budget alerts: queueing a crossing failed")

    # life cycle ----------------------------------------------------------------------

    async def start(self, owner: str | None = None) -> None:
        """Start the worker; `owner` names this replica in the ledger (the same name after
        a restart takes its unsent claims back at once; another waits for their lease)."""
        if owner:
            self.owner = owner
        if not self.webhooks or self._task is not None:
            return
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        )
        # One thread: a store takes its alert calls one at a time anyway (PostgreSQL's
        # alert session holds a lock), so more would only wait, each holding a thread.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meter-alerts")
        self._task = asyncio.create_task(self._run(), name="meter-alerts")

    async def stop(self) -> None:
        """One last try at everything pending, within the grace period; what is still
        unsent is released in the ledger, for the next replica (or start) to send."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), self.grace)
            except TimeoutError:
                log.warning("budget alerts: still sending after %.0fs; releasing the unsent ones", self.grace)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception:  # stopping goes on; the log has it
                log.exception("budget alerts: the worker failed")
        held = [job for job in self._jobs.values() if job.claimed]
        if held:
            try:
                await asyncio.wait_for(asyncio.gather(*(self._release(job) for job in held)), RELEASE_SECONDS)
            except TimeoutError:
                log.warning("budget alerts: the ledger did not take the release in %.0fs; the unsent alerts wait for their lease", RELEASE_SECONDS)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # a call still waiting on the ledger ends with its timeout
            self._executor = None

    # the worker ----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_scan = loop.time()
        while not self._stopping:
            self._wake.clear()
            if loop.time() >= next_scan:
                await self._take_over()
                next_scan = loop.time() + self.lease / 2
            self._admit()
            now = loop.time()
            due = [job for job in self._jobs.values() if job.due <= now]
            if due:
                await asyncio.gather(*(self._advance(job) for job in due))
                continue
            wake_at = min([next_scan, *(job.due for job in self._jobs.values())])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - loop.time()))
        self._admit()
        await asyncio.gather(*(self._advance(job) for job in list(self._jobs.values())))

    def _admit(self) -> None:
        while self._waiting:
            c = self._waiting.popleft()
            try:
                # Within the claim's DECIMAL(18,9) columns: a spend past them (a sum of
                # costs can pass what each cost fits) made a claim no retry could write.
                spend, limit = storable_cost(Decimal(c.spend_usd)), storable_cost(Decimal(c.limit_usd))
                alert = AlertClaim(c.budget, c.window_start.astimezone(UTC), float(c.threshold), spend, limit, c.mode)
            except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:  # a caller's bug must not end the worker
                log.error("budget alerts: a crossing that cannot be sent (%s): %r", type(exc).__name__, c)
                continue
            self._jobs.setdefault(alert.key, _Job(alert, claimed=False))

    async def _store(self, method: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, method, *args)

    def _lease_until(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.lease)

    async def _take_over(self) -> None:
        try:
            taken = await self._store(self.store.take_alerts, self.owner, datetime.now(UTC), self._lease_until())
        except Exception as exc:  # noqa: BLE001 - the ledger may be down: the next scan retries
            log.warning("budget alerts: reading unsent alerts from the ledger failed: %s", exc)
            return
        for alert in taken:
            if alert.key not in self._jobs:
                log.info("budget alerts: sending the unsent alert %s at %g (window %s)", alert.budget, alert.threshold, iso_utc(alert))
                self._jobs[alert.key] = _Job(alert, claimed=True)

    async def _advance(self, job: _Job) -> None:
        """Claim (once), send to the webhooks that lack it, record; or schedule a retry."""
        key = job.alert.key
        try:
            if not job.claimed:
                if not await self._store(self.store.claim_alert, job.alert, self.owner, self._lease_until()):
                    del self._jobs[key]  # claimed before: by another replica, or by this one earlier
                    return
                job.claimed = True
            await self._send(job)
            done = set(job.alert.delivered) >= set(self.webhooks)
            held = await self._store(self.store.update_alert, job.alert, self.owner, self._lease_until(), done)
            if done or not held:
                if not held:
                    log.warning("budget alerts: %s at %g was taken over by another replica", job.alert.budget, job.alert.threshold)
                del self._jobs[key]
                return
        except Exception as exc:  # noqa: BLE001 - a ledger failure: keep the job, try again later
            log.warning("budget alerts: the ledger failed for %s at %g: %s", job.alert.budget, job.alert.threshold, exc)
        job.attempts += 1
        job.due = asyncio.get_running_loop().time() + min(self.max_retry, self.first_retry * 2 ** (job.attempts - 1))

    async def _send(self, job: _Job) -> None:
        session = self._session
        assert session is not None
        missing = [fp for fp in self.webhooks if fp not in job.alert.delivered]
        if not missing:
            return
        body, headers = body_and_headers(job.alert)
        results = await asyncio.gather(*(post(session, self.webhooks[fp], body, headers) for fp in missing))
        budget = job.alert.budget
        accepted = []
        for fp, failure in zip(missing, results, strict=True):
            if failure is None:
                accepted.append(fp)
                self.sent[budget] = self.sent.get(budget, 0) + 1
            else:
                self.failures[budget] = self.failures.get(budget, 0) + 1
                log.warning("budget alerts: webhook %s refused %s at %g: %s", host_of(self.webhooks[fp]), budget, job.alert.threshold, failure)
        if accepted:
            job.alert = replace(job.alert, delivered=(*job.alert.delivered, *accepted))

    async def _release(self, job: _Job) -> None:
        """At stop: record what was delivered and let any replica take the rest at once."""
        try:
            await self._store(self.store.update_alert, job.alert, self.owner, None, False)
        except Exception as exc:  # noqa: BLE001 - the lease then ends on its own
            log.warning("budget alerts: releasing %s at %g failed: %s", job.alert.budget, job.alert.threshold, exc)


class AlertMetrics:
    """`meter_alerts_sent_total` and `meter_alert_failures_total` by budget, read from
    the alerter at scrape time (the server registers it with the metrics)."""

    def __init__(self, alerter: Alerter) -> None:
        self.alerter = alerter

    def describe(self) -> list[Metric]:
        return self._families(None)

    def collect(self) -> list[Metric]:
        return self._families(self.alerter)

    @staticmethod
    def _families(alerter: Alerter | None) -> list[Metric]:
        sent = CounterMetricFamily("meter_alerts_sent", "Budget alert events a webhook accepted (one per webhook).", labels=["budget"])
        failures = CounterMetricFamily("meter_alert_failures", "Budget alert POSTs that failed (each is retried).", labels=["budget"])
        if alerter is not None:
            for budget, n in sorted(alerter.sent.items()):
                sent.add_metric([budget], n)
            for budget, n in sorted(alerter.failures.items()):
                failures.add_metric([budget], n)
        return [sent, failures]
