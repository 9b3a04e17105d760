"""`meter serve --reconcile-every 1h`: reconciliation on a schedule, as gauges.

A reconciliation asks the provider's usage and costs APIs over HTTP and reads the
ledger: seconds of blocking work, so one asyncio task runs it in a thread of its
own, never on the request path.  The first run comes shortly after start, then one
every interval; a run never overlaps the previous one (the task awaits each run
before it sleeps).  Its results are read at scrape time by `ReconcileMetrics`
(`meter_reconcile_*`), labelled by verdict only: the label's values are the four
verdicts, never a key or a model, so the series stay bounded.  A failed run is one
log line and a counted failure; the gauges keep the last good run's figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..config import StartupError
from ..exposition import CounterMetricFamily, GaugeMetricFamily, Metric
from ..ledger import Store
from .compare import reconcile
from .provider import ProviderClient

log = logging.getLogger("meter.reconcile")

VERDICTS = ("match", "meter_missing", "provider_missing", "differs")
FIRST_RUN_DELAY = 5.0  # seconds after start: the listeners are up before the first run
STOP_WAIT = 5.0  # seconds stop() gives a run under way to end before the ledger closes under it
WINDOW_DAYS = 7  # each run compares the UTC days from 6 days ago to now


@dataclass(frozen=True)
class RunSummary:
    """What one reconciliation found: groups per verdict, and meter's cost minus the provider's."""

    groups: Mapping[str, int]
    cost_difference_usd: float


@dataclass
class ScheduleState:
    """What the gauges show: written by the schedule's task, read at scrape time."""

    last: RunSummary | None = None
    last_run: float = 0.0  # unix time of the last run that ended, good or bad
    last_success: float = 0.0  # unix time of the last good run
    succeeded: bool = False  # whether the last run that ended was good
    runs: int = 0
    failures: int = 0


class ReconcileSchedule:
    """Runs `run` (blocking) every `every` seconds in an executor; `start()`, then `await stop()`."""

    def __init__(self, run: Callable[[], RunSummary], every: float, *, first_delay: float | None = None) -> None:
        self.run = run
        self.every = every
        self.first_delay = min(FIRST_RUN_DELAY, every) if first_delay is None else first_delay
        self.state = ScheduleState()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="meter-reconcile")

    async def stop(self) -> None:
        """Cancel the task; a run already in its thread gets `STOP_WAIT` seconds to end (the
        ledger closes after this), then is left to finish there, its result dropped."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        deadline = time.monotonic() + STOP_WAIT
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _loop(self) -> None:
        await asyncio.sleep(self.first_delay)
        while True:
            began = time.monotonic()
            await self.run_once()
            # The next run starts an interval after this one began, or at once when it took longer.
            await asyncio.sleep(max(0.0, self.every - (time.monotonic() - began)))

    async def run_once(self) -> None:
        state = self.state
        try:
            summary = await self._in_thread()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is one line and a count, never the end of the schedule
            state.failures += 1
            state.succeeded = False
            # The exception's type and text only: no traceback holding the request's headers.
            log.warning("reconcile: run failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        else:
            state.last = summary
            state.succeeded = True
            state.last_success = time.time()
            log.info(
                "reconcile: %s; meter minus provider %.6f USD",
                ", ".join(f"{summary.groups.get(v, 0)} {v}" for v in VERDICTS), summary.cost_difference_usd,
            )
        state.runs += 1
        state.last_run = time.time()


    async def _in_thread(self) -> RunSummary:
        """`run` in a daemon thread of its own: unlike the loop's default executor, a run
        stuck on a slow provider neither holds a thread other work needs nor delays
        the process's exit after stop()."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RunSummary] = loop.create_future()

        def settle(result: RunSummary | None, error: BaseException | None) -> None:
            if future.done():
                return  # cancelled by stop(): the late result is dropped
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result, error = self.run(), None
            except Exception as exc:  # noqa: BLE001 - handed to the task, which logs it
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, result, error)

        self._thread = threading.Thread(target=work, name="meter-reconcile", daemon=True)
        self._thread.start()
        return await future


class ReconcileMetrics:
    """`meter_reconcile_*`, read from a schedule's state at scrape time."""

    def __init__(self, schedule: ReconcileSchedule) -> None:
        self.schedule = schedule

    def describe(self) -> list[Metric]:
        return self._families(None)

    def collect(self) -> list[Metric]:
        return self._families(self.schedule.state)

    @staticmethod
    def _families(state: ScheduleState | None) -> list[Metric]:
        def value(x: float) -> float | None:
            return x if state is not None else None

        groups = GaugeMetricFamily(
            "meter_reconcile_groups", "Groups in the last good reconciliation with each verdict.", labels=["verdict"],
        )
        last = state.last if state is not None else None
        if last is not None:
            for verdict in VERDICTS:
                groups.add_metric([verdict], float(last.groups.get(verdict, 0)))
        return [
            groups,
            GaugeMetricFamily(
                "meter_reconcile_cost_difference_usd", "meter's cost minus the provider's in the last good reconciliation, USD.",
                value=value(last.cost_difference_usd if last is not None else 0.0),
            ),
            GaugeMetricFamily(
                "meter_reconcile_last_run_timestamp_seconds", "Unix time the last reconciliation ended, good or failed (0: none yet).",
                value=value(state.last_run if state is not None else 0.0),
            ),
            GaugeMetricFamily(
                "meter_reconcile_last_success_timestamp_seconds", "Unix time of the last good reconciliation (0: none yet).",
                value=value(state.last_success if state is not None else 0.0),
            ),
            GaugeMetricFamily(
                "meter_reconcile_success", "1 when the last reconciliation succeeded, 0 when it failed or none has ended.",
                value=value(1.0 if state is not None and state.succeeded else 0.0),
            ),
            CounterMetricFamily("meter_reconcile_runs", "Reconciliations ended, good or failed.", value=value(state.runs if state else 0)),
            CounterMetricFamily(
                "meter_reconcile_failures", "Reconciliations that failed (provider unreachable, refused, ledger error).",
                value=value(state.failures if state else 0),
            ),
        ]


def scheduled_run(
    upstream: str, store: Store, *, admin_key_env: str, project_ids: Sequence[str] = (), tolerance: float = 0.0,
) -> Callable[[], RunSummary]:
    """The blocking run `meter serve --reconcile-every` schedules: the last `WINDOW_DAYS`
    UTC days by day and model (the verdicts), and by day (the cost difference: the
    Costs API has no model).  The admin key is read once, here: none is one line, exit 2."""
    admin_key = os.environ.get(admin_key_env, "").strip()
    if not admin_key:
        raise StartupError(f"reconcile-every: the provider's admin key is not set (environment variable {admin_key_env})")
    client = ProviderClient(upstream, admin_key)
    projects = list(project_ids)

    def run() -> RunSummary:
        until = dt.datetime.now(dt.UTC)
        since = dt.datetime.combine(until.date() - dt.timedelta(days=WINDOW_DAYS - 1), dt.time(), dt.UTC)
        by_model = reconcile(store, client, since, until, ["day", "model"], tolerance, projects)
        by_day = reconcile(store, client, since, until, ["day"], tolerance, projects)
        # Over the days the provider has costed (its costs come later than its usage):
        # a costed day meter has no cost for counts whole.
        difference = sum(
            (float((g.meter.cost_usd if g.meter is not None else None) or 0) - float(g.provider.cost_usd) for g in by_day.groups
             if g.provider is not None and g.provider.cost_usd is not None),
            0.0,
        )
        return RunSummary(by_model.counts(), difference)

    return run
