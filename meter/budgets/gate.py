"""The budget addon on the request path: refuse a matching request once spend has
reached an enforcing budget's limit, and count this replica's finished records.

`admit` runs for every request after its body is read and before it is
forwarded.  While no enforcing budget has reached its limit (the usual case) it
is one truth test of `Budgets.blocked`; only when one has does it read the
request's key, project and, if a budget needs them, the body's facts and tags
(the row will need them anyway).  A refused request gets `429` with an
OpenAI-shaped error (`meter_budget_exceeded` / `budget_exceeded`), `Retry-After`
(seconds until the window resets) and `Meter-Budget`; it never reaches the
upstream.  When several refuse it, the refusal names the one whose window ends
last, and its `Retry-After` is that reset: before it the request would be refused
again.  A request admitted runs to its end: nothing is ever cut.

Only model calls meter prices are refused (`ENFORCED`, a POST or a WebSocket's
`response.create`): retrieving, cancelling or deleting a response, listing
stored chat completions (a GET on their path), counting input tokens and other
paths add nothing to spend, and a client must still be able to fetch, or
cancel, what it started.
"""

from __future__ import annotations

import time
from typing import Any

from ..flow import Flow, Refusal
from ..identity import KeyIdentities, key_from_headers
from ..record import Record
from .spend import Budgets, BudgetState
from .windows import seconds_to_reset

ERROR_TYPE = "meter_budget_exceeded"
ERROR_CODE = "budget_exceeded"
BUDGET_HEADER = "Meter-Budget"
# The endpoints whose requests can add to spend (SPEC §3): the ones a budget refuses.
ENFORCED = frozenset({"responses", "responses.compact", "chat.completions", "embeddings"})


class BudgetGate:
    """Addon: `admit` (before forwarding) and `done` (this replica's spend)."""

    def __init__(self, budgets: Budgets, identities: KeyIdentities) -> None:
        self.budgets = budgets
        self.identities = identities

    def admit(self, flow: Flow) -> Refusal | None:
        if not self.budgets.blocked or flow.endpoint not in ENFORCED:
            return None
        if flow.method != "POST" and flow.transport != "websocket":
            return None  # a GET on a model call's path (listing stored chat completions) adds nothing
        return self._check(flow)

    def _check(self, flow: Flow) -> Refusal | None:
        now = time.time()
        budgets = self.budgets
        budgets.roll(now)  # a window that ended lets its requests through again
        headers = flow.upstream_headers if flow.upstream_headers is not None else flow.headers
        key_id: Any = _UNREAD
        # Of the budgets that refuse it, the one whose window ends last: the request is
        # refused until then, whatever the others' resets (a day's ends before its month's).
        refusing: BudgetState | None = None
        for state in budgets.blocked:
            if refusing is not None and state.end_ts <= refusing.end_ts:
                continue
            matcher = state.matcher
            if matcher.key_ids is not None and key_id is _UNREAD:
                key = key_from_headers(headers)
                key_id = self.identities.lookup(key)[0] if key else None
            if matcher.matches_request(None if key_id is _UNREAD else key_id, headers.get("OpenAI-Project"), flow.request_facts, flow.request_tags):
                refusing = state
        if refusing is None:
            return None
        refusing.rejections += 1
        return _refusal(refusing, now)

    def done(self, flow: object, record: Record) -> None:
        self.budgets.add(record)


_UNREAD = object()


def _refusal(state: BudgetState, now: float) -> Refusal:
    reset = seconds_to_reset(state.end_ts, now)
    message = (
        f"Budget {state.name!r} has reached its limit of ${state.limit} for this {state.budget.window} "
        f"(spent ${state.spend:.6f}); it resets at {state.end.isoformat()}."
    )
    return Refusal(429, ERROR_TYPE, ERROR_CODE, message, (("Retry-After", str(reset)), (BUDGET_HEADER, state.name)))
