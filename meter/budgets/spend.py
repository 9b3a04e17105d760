"""Each budget's spend in its current window, and which budgets refuse (SPEC §11).

Spend is the sum of `cost_usd` of the matching rows whose `started_at` falls in
the window, across every replica.  It is kept as two parts that never overlap,
so no row is counted twice and none is missed:

- `own`: this process's records, added as each finishes (`Budgets.add`).  Every
  record counted here is given a ledger id that starts with this process's
  random mark (`prefix`: the first 12 hex digits of the UUID);
- `others`: the ledger's rows WITHOUT that mark (other replicas, earlier runs
  of this one), read off the request path by `meter.budgets.sync`.

A record whose usage may still be taken away by the ledger's usage claim (a
background response polled through two replicas) is not counted here: it keeps
an unmarked id and comes back through `others` as the ledger settled it.  Known
spend is never more than the ledger's: nothing is reserved or guessed, so a
budget never refuses while its spend is under the limit.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from ..config import Budget
from ..ledger.schema import needs_claim, random_uuids
from ..record import Record
from .alerts import Crossing
from .matching import Matcher, matcher_for
from .windows import window_bounds

log = logging.getLogger("meter.budgets")

ZERO = Decimal(0)
_ABOVE_ALL = Decimal("Infinity")
_BELOW_ALL = Decimal("-Infinity")
_IDS_AT_ONCE = 256  # marked ids minted per refill: one read of the OS's randomness
_MATCHED_MAX = 4096  # combinations of matched-on values whose matching budgets are kept
_MATCH_KEY_CHARS = 512  # a combination longer than this in all is matched afresh each time


class BudgetState:
    """One budget in its current window."""

    __slots__ = (
        "alert_at", "budget", "end", "end_ts", "enforce", "fired", "limit", "matcher", "name", "next_alert", "others", "own", "quiet_high", "quiet_low",
        "rejections", "start", "start_ts", "synced",
    )

    def __init__(self, budget: Budget, matcher: Matcher, now: float) -> None:
        self.budget = budget
        self.name = budget.name
        self.matcher = matcher
        self.enforce = budget.mode == "enforce"
        self.limit = budget.limit_usd
        # Each alert share with the spend that crosses it, worked out once, not per record.
        self.alert_at = tuple((share, self.limit * Decimal(str(share))) for share in budget.alert_at)
        self.rejections = 0  # requests refused since start (a counter, never reset)
        self.open_window(now)

    def open_window(self, now: float) -> None:
        self.start, self.end = window_bounds(self.budget.window, now)
        self.start_ts, self.end_ts = self.start.timestamp(), self.end.timestamp()
        self.own = ZERO
        self.others = ZERO
        self.synced = False  # others' spend read from the ledger for this window
        self.fired: set[float] = set()
        self.next_alert = self._next_alert()
        # An empty quiet range until `Budgets` sets it: the next record is fully checked.
        self.quiet_low = self.quiet_high = ZERO

    def set_quiet(self, blocked: bool) -> None:
        """The spends between which `Budgets._check` has nothing to do, for this state's
        place in `blocked` and its next alert share: no refusal to start or end, no
        share to fire.  Set again whenever either changes."""
        high = self.next_alert if self.next_alert is not None else _ABOVE_ALL
        if self.enforce and not blocked:
            high = min(high, self.limit)  # reaching the limit starts refusing
        self.quiet_low = self.limit if self.enforce and blocked else _BELOW_ALL  # falling under it ends refusing
        self.quiet_high = high

    def _next_alert(self) -> Decimal | None:
        """The lowest spend that crosses an alert share not yet fired in this window (None: none left)."""
        return min((at for share, at in self.alert_at if share not in self.fired), default=None)

    @property
    def spend(self) -> Decimal:
        return self.own + self.others

    @property
    def over(self) -> bool:
        return self.spend >= self.limit

    def row(self, now: float) -> dict[str, Any]:
        """What `meter budgets` and `GET /api/budgets` show of it."""
        spend = self.spend
        state = ("exceeded" if self.enforce else "over") if spend >= self.limit else "ok"
        return {
            "budget": self.name,
            "window": self.budget.window,
            "window_start": self.start.isoformat(),
            "window_end": self.end.isoformat(),
            "mode": self.budget.mode,
            "spend_usd": spend,
            "limit_usd": self.limit,
            "remaining_usd": max(ZERO, self.limit - spend),
            "share": float(spend / self.limit),
            "state": state,
        }


class Budgets:
    """Every budget's state; `blocked` is what the request path reads (a tuple, empty
    while no enforcing budget has reached its limit: one truth test per request)."""

    def __init__(self, budgets: Sequence[Budget], key_names: Mapping[str, str], *, alerter: Any = None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.states = [BudgetState(b, matcher_for(b, key_names), now) for b in budgets]
        self.alerter = alerter  # has `crossed(Crossing)`, non-blocking
        self.blocked: tuple[BudgetState, ...] = ()
        # This process's mark on the ids of the records it counts itself (see the module doc).
        self.prefix = _mark()
        self._ids: list[str] = []
        self._next_end = min((s.end_ts for s in self.states), default=float("inf"))
        # Which budgets a record matches depends only on the fields the matchers read:
        # decided once per combination of their values, not per record (a tag budget
        # parses the tags' JSON).  None: no budget reads any field (all match everything).
        fields = sorted({name for s in self.states for name in _fields_read(s.matcher)})
        self._match_key: Callable[[Record], Any] | None = operator.attrgetter(*fields) if fields else None
        self._matched: dict[Any, tuple[BudgetState, ...]] = {}
        for state in self.states:
            state.set_quiet(False)

    # the request path -------------------------------------------------------------

    def roll(self, now: float) -> None:
        """Open the next window of every budget whose window has ended."""
        if now < self._next_end:
            return
        for state in self.states:
            if now >= state.end_ts:
                state.open_window(now)
        self._next_end = min(s.end_ts for s in self.states)
        self._update()

    def add(self, record: Record) -> None:
        """A finished record of this process: counted in every budget it matches."""
        cost = record.cost_usd
        # Only a background response can need the ledger's usage claim: the rule is read
        # for those alone (a call saved on every other record).
        if cost is None or not self.states or (record.background and needs_claim(record)):
            return
        started = record.started_at
        if started >= self._next_end:
            self.roll(started)
        rid = record.id
        if rid is not None and not rid.startswith(self.prefix):
            return  # an id minted elsewhere: the ledger counts it, through `others`
        key = self._match_key(record) if self._match_key is not None else None
        matched = self._matched.get(key)
        if matched is None:
            matched = self._match(key, record)
        counted = False
        for state in matched:
            if state.start_ts <= started < state.end_ts:
                state.own += cost
                counted = True
                if not state.quiet_low <= state.own + state.others < state.quiet_high:
                    self._check(state)
        if counted and rid is None:
            ids = self._ids
            if not ids:
                ids += random_uuids(_IDS_AT_ONCE, self.prefix)
            record.id = ids.pop()

    def _match(self, key: Any, record: Record) -> tuple[BudgetState, ...]:
        """The budgets `record` matches, kept under `key` when it is small: its values
        come from clients, so the map is bounded in entries and each entry in size."""
        matched = tuple(state for state in self.states if state.matcher.matches_record(record))
        values = key if isinstance(key, tuple) else (key,)
        if sum(len(value) for value in values if isinstance(value, str)) <= _MATCH_KEY_CHARS:
            if len(self._matched) >= _MATCHED_MAX:
                self._matched.clear()
            self._matched[key] = matched
        return matched

    # the sync task ----------------------------------------------------------------

    def windows(self) -> list[tuple[datetime, datetime]]:
        return [(s.start, s.end) for s in self.states]

    def set_others(self, windows: Sequence[tuple[datetime, datetime]], sums: Sequence[Decimal]) -> None:
        """The ledger's unmarked spend of each budget, read for `windows`; a budget whose
        window has moved on since keeps what it has (its next read is for the new one)."""
        for state, window, total in zip(self.states, windows, sums, strict=True):
            if (state.start, state.end) == window:
                state.others = total
                state.synced = True
                self._check(state)

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        self.roll(now)
        return [s.row(now) for s in self.states]

    # state changes ----------------------------------------------------------------

    def _check(self, state: BudgetState) -> None:
        spend = state.own + state.others
        if state.enforce and (spend >= state.limit) != (state in self.blocked):
            self._update()
        next_alert = state.next_alert
        if next_alert is not None and spend >= next_alert:
            for share, at in state.alert_at:
                if share not in state.fired and spend >= at:
                    state.fired.add(share)
                    self._alert(state, share, spend)
            state.next_alert = state._next_alert()
        state.set_quiet(state in self.blocked)

    def _update(self) -> None:
        self.blocked = blocked = tuple(s for s in self.states if s.enforce and s.over)
        for state in self.states:
            state.set_quiet(state in blocked)

    def _alert(self, state: BudgetState, share: float, spend: Decimal) -> None:
        if self.alerter is None:
            return
        crossing = Crossing(budget=state.name, window_start=state.start, threshold=share, spend_usd=spend, limit_usd=state.limit, mode=state.budget.mode)
        try:
            self.alerter.crossed(crossing)
        except Exception:  # an alert must never cost a request its answer
            log.exception("budget alert for %s failed", state.name)


def _fields_read(matcher: Matcher) -> tuple[str, ...]:
    """The record fields `matcher.matches_record` reads."""
    fields: tuple[str, ...] = ("key_id",) if matcher.key_ids is not None else ()
    fields += ("project",) if matcher.project is not None else ()
    fields += ("user_id",) if matcher.user is not None else ()
    fields += ("model_requested", "model") if matcher.model is not None else ()
    return fields + (("tags",) if matcher.tags else ())


def _mark() -> str:
    """12 random hex digits in UUID form (`xxxxxxxx-xxxx`): the ids of this process's
    counted records start with them.  Another replica's random id starts the same way
    once in 2^48."""
    h = os.urandom(6).hex()
    return f"{h[:8]}-{h[8:12]}"
