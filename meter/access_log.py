"""The access log (`--access-log`): one line per finished request, for people who
read logs rather than the ledger.

An addon with a `done` hook, after the enrichers (the line carries the price),
writing to the `meter.access` logger at INFO:

    POST /v1/responses 200 model=gpt-4o tokens=12/34 cost_usd=0.000330000 duration_ms=412 key_id=3f1c0b9a7d2e4c11

method, path (never the query: queries can carry credentials), status, the
model that served it (else the one asked for), input/output tokens, cost,
duration and key_id; `-` where a value is unknown.  The key is only ever its
key_id.  A client's text (a model name) is quoted when it holds spaces or
control characters, so one request is always one line.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .record import Record

LOGGER_NAME = "meter.access"
# Longest client-supplied text written as is; the rest is cut (a 4 MiB model name
# must not make a 4 MiB log line).
_MAX_TEXT = 200


def _text(value: str | None) -> str:
    if not value:
        return "-"
    value = value[:_MAX_TEXT]
    return value if value.isprintable() and " " not in value else json.dumps(value)


def _known(value: object) -> str:
    return "-" if value is None else str(value)


def access_line(record: Record) -> str:
    """The line for one record (the format above)."""
    duration = "-" if record.duration_ms is None else f"{record.duration_ms:.0f}"
    tokens = f"{_known(record.input_tokens)}/{_known(record.output_tokens)}"
    return (
        f"{record.method} {_text(record.path)} {_known(record.status_code)} model={_text(record.model or record.model_requested)} "
        f"tokens={tokens} cost_usd={_known(record.cost_usd)} duration_ms={duration} key_id={record.key_id or '-'}"
    )


class AccessLog:
    """The addon: `done` writes the record's line; nothing is kept between requests."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger(LOGGER_NAME)

    async def start(self) -> None:
        # Asked for, the lines show at any --log-level (they are INFO; the default level is too).
        if self.log.getEffectiveLevel() > logging.INFO:
            self.log.setLevel(logging.INFO)

    def done(self, flow: Any, record: Record) -> None:
        if self.log.isEnabledFor(logging.INFO):
            self.log.info("%s", access_line(record))
