"""Addons that complete a record before the sinks see it: usage counted once, and its price.

They run first in the addon list, so the ledger, metrics and traces all see the
same, final record.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .bounds import short_key
from .record import Record

_ENTRY_OVERHEAD = 120  # an OrderedDict entry and a small str object, roughly


class CountUsageOnce:
    """Usage of a response id counts once, however often it is retrieved.

    A foreground response's usage belongs to the request that created it (the
    POST, or the response on a WebSocket): retrievals of it carry none.  A
    background response shows its usage on every `GET /v1/responses/{id}` after
    it ends; only the first row that shows it keeps it, so only background ids are
    kept.  This in-process memory
    is a fast first line (it also keeps metrics honest); the ledger's
    `usage_claims` table of background response ids enforces the rule across
    restarts and replicas.
    """

    def __init__(self, max_ids: int = 200_000, max_bytes: int = 16 << 20) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()  # id -> the bytes it holds here
        self._max = max_ids
        self._max_bytes = max_bytes
        self.held_bytes = 0

    def done(self, flow: Any, record: Record) -> None:
        # The background flag first: a foreground call (nearly every one) is then one
        # attribute and one string comparison, with no look at its usage.
        if not record.background:
            if record.endpoint == "responses.retrieve" and record.response_id is not None and record.has_usage:
                record.clear_usage()
            # Else its creating request: a foreground response's usage shows again only
            # on retrievals, cleared just above, so its id need not be kept (at full
            # load that was ~16 MiB of ids for nothing).
            return
        rid = record.response_id
        if rid is None or not record.has_usage:
            return
        rid = short_key(rid)  # ids come from outside: bounded in bytes as well as in entries
        seen = self._seen
        if rid in seen:
            record.clear_usage()
            return
        size = _ENTRY_OVERHEAD + len(rid)
        seen[rid] = size
        self.held_bytes += size
        while len(seen) > self._max or self.held_bytes > self._max_bytes:
            self.held_bytes -= seen.popitem(last=False)[1]


class Pricing:
    """Sets `cost_usd` from the record's usage, model, served tier and date."""

    def __init__(self, pricer: Any) -> None:
        self.pricer = pricer

    def done(self, flow: Any, record: Record) -> None:
        self.pricer.price_record(record)
