"""How much of a value from outside meter keeps, from the moment it reads it.

The ledger keeps the ids, model names, user and project to `MAX_TEXT`
characters (`meter.ledger.sanitise` makes that final cut and counts it).  What
holds such values before the ledger does (a record waiting in the writer's
queue, a cache of response ids or WebSocket lanes) keeps them short here, so
that a client's megabytes never sit in meter's memory.

Numbers too: the ranges of the ledger's column types are here, and a record is
held to them when it is built and priced (`note_overflow`), not only when it is
stored, so that the metrics and the budgets, which see the record before the
ledger does, count what the ledger keeps (SPEC §2b).
"""

from __future__ import annotations

import hashlib
import operator
from decimal import Decimal

from .record import Record

MAX_TEXT = 256

# The ledger's number columns: BIGINT (the counts, the byte sizes), INTEGER (the
# status), DECIMAL(18,9) (`cost_usd`, and the alert claims' spend and limit): 9 digits
# before the point, 9 after.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
COST_LIMIT = Decimal(10) ** 9  # every cost the column holds is strictly within +-COST_LIMIT
COST_QUANTUM = Decimal(1).scaleb(-9)
COST_MAX = COST_LIMIT - COST_QUANTUM  # the largest it holds

# The usage anomaly of a number the ledger cannot hold, and the `error_type` of its row
# (the row's only trace of it: the column is NULL), with the column as `error_code`.
OVERFLOW = "overflow"
OVERFLOW_ERROR = "usage_overflow"


def note_overflow(record: Record, column: str) -> None:
    """Say on `record` that `column` held a number the ledger cannot (now NULL): an
    `overflow` anomaly, which leaves it unpriced, and, unless the row already says
    another error, `error_type` `usage_overflow` naming the column, so that the stored
    row is never priced later (`meter reprice`) from the counts that remain."""
    if OVERFLOW not in record.anomalies:
        record.anomalies = (OVERFLOW, *record.anomalies)
    if record.error_type is None:
        record.error_type, record.error_code = OVERFLOW_ERROR, column


def storable_cost(value: Decimal) -> Decimal:
    """`value` within what DECIMAL(18,9) holds: a sum of costs (a budget's spend)
    can pass the column each cost fits, and a claim that cannot be written is an
    alert that is never sent."""
    return min(max(value, -COST_MAX), COST_MAX).quantize(COST_QUANTUM)
# Every text column whose value comes from outside: a client's request target, body or
# headers, or the upstream's answer.  Each is cut to `MAX_TEXT`: a 40 MB
# `service_tier` kept whole failed the DuckDB ledger's insert for memory, an outage
# that held every later record back.
BOUNDED_TEXT: tuple[str, ...] = (
    "model", "model_requested", "response_id", "previous_response_id", "upstream_request_id", "user_id", "project", "session_id",
    "method", "path", "service_tier_requested", "service_tier", "error_type", "error_code", "cache_status",
)  # fmt: skip
_bounded = operator.attrgetter(*BOUNDED_TEXT)


def cut_bounded_text(record: Record, limit: int) -> list[str]:
    """Cut each bounded text field longer than `limit`; the names of those cut."""
    cut = []
    for name, value in zip(BOUNDED_TEXT, _bounded(record)):
        if value is not None and len(value) > limit:
            setattr(record, name, value[:limit])
            cut.append(name)
    return cut


def keep_text_short(record: Record) -> None:
    """On the request path: cut the bounded text to one character past its bound.

    A record may wait long in the queue (the store is down) and must not hold a
    client's megabytes meanwhile; `sanitise` makes the final cut, and counts it.
    One sum in C tells the usual record, all of whose bounded text fits, at once.
    """
    try:
        if sum(map(len, filter(None, _bounded(record)))) <= MAX_TEXT:
            return
    except TypeError:  # a value that is not text: sanitise deals with it
        return
    cut_bounded_text(record, MAX_TEXT + 1)


def short_key(value: str) -> str:
    """What an in-memory cache keeps of a value from outside (a response id, a lane):
    the value, or its digest when it is longer than the ledger keeps, so that a
    cache of many entries stays small whatever the values."""
    if len(value) <= MAX_TEXT:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
