"""The ledger record: one finished request (or one WebSocket response), as the sinks see it.

The field list is the `requests` table of SPEC §4, in its order; ledgers, metrics,
traces and reports all read this one type.  It is a slotted dataclass, not a
pydantic model, because one is built per request on the hot path; validation
happens where data enters (config, parsed JSON), not here.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# Every value of `endpoint` (SPEC §4): what `meter.observe.endpoint_for` answers.
ENDPOINTS = (
    "responses",
    "responses.retrieve",
    "responses.compact",
    "responses.input_tokens",
    "responses.cancel",
    "responses.delete",
    "chat.completions",
    "embeddings",
    "other",
)

USAGE_FIELDS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "web_search_calls",
    "cache_status",
    "cache_missed_tokens",
)


@dataclass(slots=True)
class Record:
    id: str | None  # minted by the ledger writer, off the event loop
    started_at: float  # epoch seconds; the ledger stores TIMESTAMPTZ
    finished_at: float
    method: str
    path: str
    endpoint: str
    transport: str = "http"
    status_code: int | None = None
    outcome: str = "completed"
    stream: bool = False
    background: bool = False
    model_requested: str | None = None
    model: str | None = None
    response_id: str | None = None
    previous_response_id: str | None = None
    upstream_request_id: str | None = None
    service_tier_requested: str | None = None
    service_tier: str | None = None
    input_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    web_search_calls: int | None = None
    cache_status: str | None = None
    cache_missed_tokens: int | None = None
    cost_usd: Decimal | None = None
    key_id: str | None = None
    key_hint: str | None = None
    key_name: str | None = None
    project: str | None = None
    user_id: str | None = None
    tags: str | None = None  # JSON text of the request's metadata merged with its Meter-Tag-* headers
    session_id: str | None = None  # SPEC §10 (meter.attribution)
    ttfb_ms: float | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    upstream_processing_ms: float | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    error_type: str | None = None
    error_code: str | None = None
    trace_id: str | None = None
    # Not ledger columns: facts the sinks need but the table does not keep.
    anomalies: tuple[str, ...] = ()
    priced: bool = False  # cost_usd was computed (False with usage = unpriced)
    cut: tuple[str, ...] = ()  # values cut before the record was made ("tags", "request"), counted by the ledger
    session_of: str | None = None  # a previous_response_id whose session is still to find (the ledger writer asks the store)
    # A retrieve carrying a background response's usage: the response whose creating row
    # it is still to be credited to (meter.attribution.Attribution; the writer asks the store).
    attribution_of: str | None = None

    @property
    def has_usage(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None or self.total_tokens is not None

    def clear_usage(self) -> None:
        """Drop usage already counted elsewhere (same response id seen before)."""
        for name in USAGE_FIELDS:
            setattr(self, name, None)
        self.cost_usd = None
        self.priced = False

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Record))
# A record as a plain tuple in field order (`Record(*row)` rebuilds it): a third
# of the cost of pickling the dataclass, which matters when batches cross processes.
record_row = operator.attrgetter(*FIELDS)

_NOT_COLUMNS = {"anomalies", "priced", "cut", "session_of", "attribution_of"}
COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Record) if f.name not in _NOT_COLUMNS)
