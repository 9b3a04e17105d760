"""How much of a value from outside meter keeps, from the moment it reads it.

The ledger keeps the ids, model names, user and project to `MAX_TEXT`
characters (`meter.ledger.sanitise` makes that final cut and counts it).  What
holds such values before the ledger does (a record waiting in the writer's
queue, a cache of response ids or WebSocket lanes) keeps them short here, so
that a client's megabytes never sit in meter's memory.
"""

from __future__ import annotations

import hashlib
import operator

from .record import Record

MAX_TEXT = 256
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
